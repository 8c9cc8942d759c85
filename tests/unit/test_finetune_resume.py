"""A training killed with SIGKILL after a checkpoint resumes to the same head as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from safetensors import safe_open

from vfm.cli import main

FASHION = "idx:/usr/share/datasets/fashion-mnist"
EPOCHS = 6


def _args(out, cache):
    return ["finetune", "train", "--backbone", "pixels", "--data", FASHION, "--limit", "3000", "--head", "mlp",
            "--hidden", "256", "--dropout", "0.1", "--lr", "0.01,0.1", "--epochs", str(EPOCHS), "--batch-size", "16",
            "--patience", "0", "--seed", "7", "--out", str(out), "--cache-dir", str(cache), "--quiet"]


def _checkpoint_epoch(path):
    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads(f.metadata()["state"])["epoch"]
    except Exception:  # not written yet
        return 0


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    cache = tmp_path / "cache"
    assert main(_args(tmp_path / "whole", cache)) == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vfm", *_args(out, cache)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_epoch(out / "checkpoint.safetensors") < 1:
            assert proc.poll() is None, "the run ended before its first checkpoint could be seen"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _checkpoint_epoch(out / "checkpoint.safetensors")
    assert 1 <= killed_at < EPOCHS and not (out / "head.json").exists()

    assert main([*_args(out, cache), "--resume"]) == 0
    assert (out / "head.safetensors").read_bytes() == (tmp_path / "whole" / "head.safetensors").read_bytes()
    resumed, whole = (json.loads((p / "run.json").read_text()) for p in (out, tmp_path / "whole"))
    assert resumed["heads"] == whole["heads"]  # every head, every epoch's scores

"""bench/finetune.py and bench/finetune_unfreeze.py refuse bad flags in one line (exit 2) before it loads anything."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "finetune.py"
UNFREEZE_BENCH = BENCH.with_name("finetune_unfreeze.py")


@pytest.mark.parametrize("flags, message", [
    (["--heads-only", "--rounds", "2"], "--rounds is for the extraction rows, which --heads-only skips"),
    (["--heads-only", "--no-onnx"], "--no-onnx is for the extraction rows, which --heads-only skips"),
    (["--heads-only", "--repository", "x"], "--repository is for the extraction rows, which --heads-only skips"),
    (["--heads-only", "--workers", "1"], "--workers is for the extraction rows, which --heads-only skips"),
    (["--repeats", "0"], "--repeats 0: give 1 or more"),
    (["--limit", "2"], "--limit 2: give 3 or more"),
    (["--head-threads", "0"], "--head-threads 0: give 1 or more"),
    (["--hidden", "512,x"], "--hidden '512,x': give widths of 1 or more"),
    (["--repeats", "many"], "argument --repeats: invalid int value: 'many'"),
])
def test_bad_bench_flags_are_one_line_errors(flags, message):
    out = subprocess.run([sys.executable, str(BENCH), *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,x"], "--seeds '0,x': give comma-separated integers"),
    (["--seeds", "1,1"], "--seeds '1,1': give one or more distinct integers"),
    (["--seeds", ","], "--seeds ',': give one or more distinct integers"),
    (["--seeds", "0,1", "--cache-dir", "x"], "--cache-dir holds one seed's activations: leave it out with --seeds"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_bad_unfreeze_bench_flags_are_one_line_errors(flags, message):
    out = subprocess.run([sys.executable, str(UNFREEZE_BENCH), *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr

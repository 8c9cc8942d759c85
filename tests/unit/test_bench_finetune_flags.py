"""bench/finetune.py and bench/finetune_unfreeze.py refuse bad flags in one line (exit 2) before they load anything."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script, flags, message", [
    ("finetune.py", ["--heads-only", "--rounds", "2"], "--rounds is for the extraction rows, which --heads-only skips"),
    ("finetune.py", ["--heads-only", "--no-onnx"], "--no-onnx is for the extraction rows, which --heads-only skips"),
    ("finetune.py", ["--heads-only", "--repository", "x"],
     "--repository is for the extraction rows, which --heads-only skips"),
    ("finetune.py", ["--heads-only", "--workers", "1"], "--workers is for the extraction rows, which --heads-only skips"),
    ("finetune.py", ["--repeats", "0"], "--repeats 0: give 1 or more"),
    ("finetune.py", ["--limit", "2"], "--limit 2: give 3 or more"),
    ("finetune.py", ["--head-threads", "0"], "--head-threads 0: give 1 or more"),
    ("finetune.py", ["--hidden", "512,x"], "--hidden '512,x': give widths of 1 or more"),
    ("finetune.py", ["--repeats", "many"], "argument --repeats: invalid int value: 'many'"),
    ("finetune.py", ["--pairs", "-1"], "--pairs -1: give 0 or more"),
    ("finetune_unfreeze.py", ["--seeds", "0,x"], "--seeds '0,x': give comma-separated integers"),
    ("finetune_unfreeze.py", ["--seeds", "1,1"], "--seeds '1,1': give one or more distinct integers"),
    ("finetune_unfreeze.py", ["--seeds", ","], "--seeds ',': give one or more distinct integers"),
    ("finetune_unfreeze.py", ["--seeds", "0,1", "--cache-dir", "x"],
     "--cache-dir holds one seed's activations: leave it out with --seeds"),
    ("finetune_unfreeze.py", ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ("finetune_unfreeze.py", ["--test", "x"], "argument --test: invalid choice: 'x'"),
    ("finetune_unfreeze.py", ["--test", "split", "--test-cache", "x"],
     "--test-cache holds the whole test split's activations: it goes with --test all"),
])
def test_bad_bench_flags_are_one_line_errors(script, flags, message):
    out = subprocess.run([sys.executable, str(BENCH / script), *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr

"""Benchmark (not a test): ONNX Runtime / PyTorch latency of the same runner task, side by side in one run.

    .venv/bin/python bench/backends.py [--models tiny_cnn,efficientnet_lite0,...] [--device cpu]
                                       [--threads N] [--rounds 7] [--weights random]

For every model: export it to ONNX in a temporary repository (parity checked), load the
PyTorch and the ONNX Runtime runner on the same device with the same thread count, then time
the runner's own task method (preprocessing and post-processing included, as the service
calls it) at batch 1 and batch 8; SAM is timed as its encoder (``encode``, one image) and its
decoder (``segment``, 1 and 8 prompts on a cached embedding). Rounds alternate the two
backends so that a change in machine load hits both alike; each figure is the median over
rounds. Prints a table with the ratio ONNX Runtime / PyTorch (below 1: ONNX Runtime is faster),
and per model what its export cost: each export runs in a fresh Python process (``export_model``,
as ``vfm export`` does), timed wall clock, with that process's peak resident memory (its
``ru_maxrss``, which includes importing torch and ONNX Runtime, about 0.5 GB); "reused" when
``--repository`` already held an export from the same weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_MODELS = ("tiny_cnn", "efficientnet_lite0", "tiny_vit", "tiny_detector", "mtcnn_faces", "tiny_sam")
IMAGE_SIZE = (480, 640)  # (height, width): a VGA photo


def images(n: int, seed: int) -> list[np.ndarray]:
    from vfm.models.export.common import parity_images

    return parity_images(seed, [IMAGE_SIZE] * n)


def cases(name: str, task: str, runner_images: Callable[[int], list[np.ndarray]]
          ) -> list[tuple[str, Callable[[Any], Callable[[], Any]]]]:
    """(label, make(runner) -> a zero-argument call to time) for the model's main task."""
    from vfm.models.export.sam import parity_prompts

    one, eight = runner_images(1), runner_images(8)
    if task == "segment":
        prompts = parity_prompts(np.random.default_rng(0), *IMAGE_SIZE)
        eight_prompts = (prompts * 2)[:8]

        def decoder(n: int) -> Callable[[Any], Callable[[], Any]]:
            def make(runner: Any) -> Callable[[], Any]:
                embedding = runner.encode(one)[0]
                chosen = prompts[:1] if n == 1 else eight_prompts
                return lambda: runner.segment(embedding, chosen)
            return make

        return [("encoder, 1 image", lambda r: lambda: r.encode(one)),
                ("decoder, 1 prompt", decoder(1)), ("decoder, 8 prompts", decoder(8))]
    method = {"classify": "classify", "embed": "embed", "detect": "detect"}[task]
    return [(f"{method}, batch {len(batch)}", lambda r, b=batch: lambda: getattr(r, method)(b))
            for batch in (one, eight)]


def export_in_child(name: str, repository: str, weights: str | None) -> tuple[float, float]:
    """Export ``name`` into ``repository`` in a fresh Python process: (wall seconds, peak RSS in GB of that
    process). A failed export raises ``RuntimeError`` with the child's last line of output."""
    code = ("import sys; from vfm.models.export import export_model; "
            "export_model(sys.argv[1], sys.argv[2], weights=sys.argv[3] or None)")
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, name, repository, weights or ""], stdout=output,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage (ru_maxrss in KiB on Linux)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit status {child.returncode}")
    return seconds, usage.ru_maxrss / 2**20


SETTLE_S = 0.3


def time_pair(make: Callable[[Any], Callable[[], Any]], torch_runner: Any, onnx_runner: Any, rounds: int,
              clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    calls = {"torch": make(torch_runner), "onnx": make(onnx_runner)}
    for call in calls.values():  # warm-up: lazy initialisation, allocator, first-shape compilation
        call()
    samples: dict[str, list[float]] = {"torch": [], "onnx": []}
    for i in range(rounds):
        order = ("torch", "onnx") if i % 2 == 0 else ("onnx", "torch")
        for key in order:
            # The other backend's pool threads spin for a while after its call (ONNX Runtime's, and libgomp's
            # under torch) and take a core from this one on a 2-core machine: let them go idle first. Without
            # this pause resnet50's torch batch 1 read 67.7 ms here against 44-45 ms in a process of its own.
            time.sleep(SETTLE_S)
            start = clock()
            calls[key]()
            samples[key].append(clock() - start)
    return statistics.median(samples["torch"]), statistics.median(samples["onnx"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (both backends get the same)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of both backends")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per backend and case (median)")
    parser.add_argument("--weights", default=None, help="e.g. random, for full-size models without a download")
    parser.add_argument("--repository", default=None, help="reuse exports from here (default: a temporary one)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (steadier on a machine shared with other work; "
                             "use with --threads 1, where no pool thread spins)")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch

    from vfm.models import get_spec, load_model
    from vfm.models.export import find_export

    torch.set_num_threads(args.threads)
    # Exports go to a temporary repository unless --repository names one to keep; the temporary one is removed
    # however the run ends (an export of every model is hundreds of MB).
    made = None if args.repository else tempfile.mkdtemp(prefix="vfm-bench-")
    repository = args.repository or made
    try:
        print(f"ONNX Runtime / PyTorch, device {args.device}, {args.threads} threads each, {args.rounds} rounds, "
              f"images {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}, {args.clock} clock, load average {os.getloadavg()}; "
              f"repository {repository}")
        print(f"{'model':<22} {'case':<20} {'PyTorch ms':>11} {'ORT ms':>9} {'ORT/PyTorch':>12} "
              f"{'export s':>9} {'export peak RSS':>16}")
        failed = 0
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            spec = get_spec(name)
            try:
                find_export(name, repository, args.weights)
                export_cost = f"{'reused':>9} {'':>16}"
            except Exception:  # not there or made from other weights: export (and parity-check) it now
                try:
                    seconds, peak_gb = export_in_child(name, repository, args.weights)
                except RuntimeError as exc:
                    print(f"{name:<22} export failed: {exc}", flush=True)
                    failed += 1
                    continue
                export_cost = f"{seconds:>9.1f} {peak_gb:>13.2f} GB"
            torch_runner = load_model(name, device=args.device, weights=args.weights)
            onnx_runner = load_model(name, backend="onnx", device=args.device, weights=args.weights,
                                     repository=repository, num_threads=args.threads)
            for label, make in cases(name, spec.task, lambda n: images(n, seed=1)):
                t_torch, t_onnx = time_pair(make, torch_runner, onnx_runner, args.rounds, clock)
                print(f"{name:<22} {label:<20} {t_torch * 1e3:>11.2f} {t_onnx * 1e3:>9.2f} "
                      f"{t_onnx / t_torch:>12.2f} {export_cost}", flush=True)
                export_cost = ""  # once per model, on its first row
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

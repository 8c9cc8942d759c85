"""Benchmark (not a test): SAM's image encoder exported fused (``--fuse`` levels) against the graph as
traced, and against PyTorch: node counts, latency side by side, and what each export cost.

    .venv/bin/python bench/sam_encoder_fusion.py [--model tiny_sam] [--weights random] [--threads 2]
                                                 [--rounds 5] [--levels none,attention,all] [--clock wall]

Every level is exported in a fresh Python process (``export_model(..., fuse=LEVEL)``, parity checked
as ``vfm export`` does), timed wall clock with that process's peak resident memory (``ru_maxrss``:
it includes importing torch and ONNX Runtime, about 0.5 GB). Then the encoder graphs and the PyTorch
``image_encoder`` run on the same normalised ``[1, 3, S, S]`` input with the same thread count, each
with the session options the export recorded; rounds alternate the backends so that a change in
machine load hits all alike; each figure is the median. The load average is printed with them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def export_in_child(name: str, repository: Path, weights: str | None, level: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of ``export_model(name, fuse=level)`` in a fresh process."""
    code = ("import sys; from vfm.models.export import export_model; "
            "export_model(sys.argv[1], sys.argv[2], weights=sys.argv[3] or None, fuse=sys.argv[4])")
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, name, str(repository), weights or "", level],
                                 stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            raise SystemExit(f"export {name} --fuse {level} failed: {lines[-1] if lines else status}")
    return seconds, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_sam")
    parser.add_argument("--weights", default=None, help="e.g. random, for sam_vit_b without the checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--levels", default="none,attention", help="fusion levels to export and time")
    parser.add_argument("--repository", default=None, help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (steadier on a loaded machine; with one thread)")
    args = parser.parse_args()

    import json

    import onnx
    import torch
    from tqdm import tqdm

    from vfm.models import load_model
    from vfm.models.backends.onnx import OnnxSession, SessionSettings

    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    root = Path(args.repository or tempfile.mkdtemp(prefix="vfm-samfuse-"))
    print(f"load average before: {os.getloadavg()}")
    exports = {}
    for level in tqdm(levels, desc="exports"):
        seconds, peak = export_in_child(args.model, root / level, args.weights, level)
        folder = next((root / level).rglob("config.json")).parent
        config = json.loads((folder / "config.json").read_text())
        graph = onnx.load(str(folder / "1" / "encoder.onnx"), load_external_data=False).graph
        exports[level] = (folder, config, seconds, peak, len(graph.node))
        print(f"  {level:>9}: export {seconds:.1f} s, peak RSS {peak:.2f} GB, encoder {len(graph.node)} nodes, "
              f"fusions {config['graphs']['encoder']['optimization']}, "
              f"embeddings max diff {config['parity']['image_embeddings_max_abs_diff']:.3g} "
              f"(scale {config['parity']['image_embeddings_scale']:.3g}); top ops "
              f"{Counter(n.op_type for n in graph.node).most_common(6)}")

    torch.set_num_threads(args.threads)
    runner = load_model(args.model, device="cpu", weights=args.weights)
    encoder = runner.model.image_encoder.eval()
    size = exports[levels[0]][1]["runtime"]["img_size"]
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    calls = {"pytorch": lambda: encoder(torch.from_numpy(image))}
    for level, (folder, config, *_rest) in exports.items():
        session = OnnxSession(folder / "1" / "encoder.onnx", SessionSettings(device="cpu", num_threads=args.threads),
                              config.get("session"))
        calls[f"ort {level}"] = lambda s=session.session: s.run(None, {"image": image})
    samples: dict[str, list[float]] = {k: [] for k in calls}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.inference_mode():
        for call in calls.values():
            call()                                        # warm-up
        for i in tqdm(range(args.rounds), desc="rounds"):
            keys = list(calls) if i % 2 == 0 else list(reversed(calls))
            for key in keys:
                start = clock()
                calls[key]()
                samples[key].append(clock() - start)
    torch_s = statistics.median(samples["pytorch"])
    print(f"\n{args.model} encoder, 1 image {size}x{size}, {args.threads} threads, {args.clock} clock, median of {args.rounds} "
          f"(load average after: {os.getloadavg()})")
    for key, values in samples.items():
        median = statistics.median(values)
        print(f"  {key:>14}: {median * 1000:9.1f} ms   / PyTorch {median / torch_s:.2f}   "
              f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})")


if __name__ == "__main__":
    main()

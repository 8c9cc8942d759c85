"""Benchmark (not a test): int8 and float16 ONNX Runtime latency / float32 ONNX Runtime, with the
top-1 agreement each variant keeps on real photos, side by side in one run.

    .venv/bin/python bench/quantize.py [--models efficientnet_lite0,resnet50,convnext_tiny]
        [--weights random] [--threads 2] [--rounds 5] [--reps 5] [--methods static,static-per-tensor,dynamic,float16]
        [--calibration FOLDER]

For every model: export float32 (parity-checked against PyTorch) into a temporary repository,
make each variant from that graph (``vfm.models.export.quantize``; static int8 calibrated on
``--calibration`` or, by default, 24 random blob-and-edge images, which are not the check
photos), check it against float32 on scikit-image's photos (57 views of 19 photos), then time
the graph alone (``session.run`` on a preprocessed batch) and the runner's ``classify`` (640x480
photos, preprocessing included, as the service calls it) at batch 1 and 8. Rounds alternate the
variants so that a change in machine load hits all alike; in a round each variant has the process to
itself (its session made, three untimed calls, then the median of --reps timed ones, then closed: a
second live session's idle pool threads spin for a while and took a core from the one being timed,
which made float32 efficientnet_lite0 read 7 ms at batch 1 instead of 2.8). Each figure is the median
over the rounds. Agreement
of random weights is printed but means nothing (a random network is sure of no photo).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {"static": ("int8", True, True), "static-per-tensor": ("int8", True, False),
           "dynamic": ("int8", False, True), "float16": ("float16", False, False)}


def ms_of(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet50,convnext_tiny")
    parser.add_argument("--weights", default=None, help="random for the models without offline weights "
                                                        "(efficientnet_lite0 always uses its real ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per round after an untimed one (median)")
    parser.add_argument("--methods", default="static,static-per-tensor,dynamic")
    parser.add_argument("--calibration", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from vfm.models import get_spec, load_model
    from vfm.models.backends.onnx import OnnxSession, SessionSettings
    from vfm.models.export import export_model
    from vfm.models.export.common import parity_images
    from vfm.models.export.quantize import VariantOptions, check_classifier, float16_graph, quantize_graph
    from vfm.models.images import preprocess_batch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    work = Path(tempfile.mkdtemp(prefix="vfm-bench-quantize-"))
    calibration = args.calibration
    if calibration is None:
        calibration = work / "calibration"
        calibration.mkdir()
        for i, image in enumerate(parity_images(3, [(300, 400), (400, 300)] * 12)):
            Image.fromarray(image).save(calibration / f"{i:02d}.png")
    photos = parity_images(11, [(480, 640)] * 8)
    rows = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            spec = get_spec(name)
            real = name == "efficientnet_lite0" or args.weights is None
            weights = None if name == "efficientnet_lite0" else args.weights
            t0 = time.perf_counter()
            result = export_model(name, work / "repo", weights=weights)
            print(f"{name}: float32 export {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            float_path = result.folder / "1" / "model.onnx"
            graphs = {"float32": float_path}
            checks: dict[str, dict[str, Any]] = {}
            for method in methods:
                kind, static, per_channel = METHODS[method]
                options = VariantOptions(quantize="int8" if kind == "int8" else None,
                                         dtype="float16" if kind == "float16" else "float32",
                                         calibration=calibration if static else None, per_channel=per_channel,
                                         min_agreement=0.0, min_margin=0.1 if real else 0.0)
                path = work / f"{name.replace('/', '--')}.{method}.onnx"
                t0 = time.perf_counter()
                (quantize_graph(float_path, path, spec, options) if kind == "int8"
                 else float16_graph(float_path, path, options))
                made_s = time.perf_counter() - t0
                checks[method] = check_classifier(float_path, path, spec, options)
                checks[method]["made_s"] = made_s
                graphs[method] = path
                print(f"{name}: {method} made in {made_s:.0f} s, agreement {checks[method]['top1_agreement']} "
                      f"(all views {checks[method]['top1_agreement_all_views']})", file=sys.stderr, flush=True)
            settings = SessionSettings(device="cpu", num_threads=args.threads)
            runner = load_model(name, backend="onnx", device="cpu", repository=work / "repo", weights=weights,
                                num_threads=args.threads)
            batches = {b: preprocess_batch(photos[:b], spec.preprocess) for b in (1, 8)}
            times: dict[tuple[str, int, str], list[float]] = {}
            for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                for key, path in graphs.items():
                    # One session alive at a time, as in a replica: a second session's pool threads spin for a
                    # while after its last run and take a core from the one being timed (2 cores here).
                    session = OnnxSession(path, settings)
                    runner.network = runner.networks["model"] = session  # one runner over each graph
                    for b, batch in batches.items():
                        calls = {"graph": lambda: session.run({"input": batch}, ["logits"]),
                                 "classify": lambda: runner.classify(photos[:b], top_k=5)}
                        for what, call in calls.items():
                            for _ in range(3):  # untimed: the first calls of a shape set up its buffers
                                call()
                            times.setdefault((key, b, what), []).append(
                                statistics.median(ms_of(call) for _ in range(args.reps)))
                    runner.network = runner.networks["model"] = None
                    del session
            load = os.getloadavg()
            for key in graphs:
                row = {"model": name, "weights": "real" if real else "random", "graph": key,
                       "load": f"{load[0]:.1f}"}
                for b in (1, 8):
                    for what in ("graph", "classify"):
                        ms = statistics.median(times[(key, b, what)][1:])
                        ref = statistics.median(times[("float32", b, what)][1:])
                        row[f"{what} b{b}"] = f"{ms:.1f} ms ({ms / ref:.2f})"
                check = checks.get(key)
                row["agreement"] = ("-" if check is None else
                                    f"{check['top1_agreement']} of {check['sure_views']} sure, "
                                    f"{check['top1_agreement_all_views']} all" + ("" if real else " (random: n/a)"))
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = list(rows[0]) if rows else []
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print(f"threads {args.threads}, rounds {args.rounds}, uptime load {os.getloadavg()}; ratio = variant / float32 "
          "(below 1: faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

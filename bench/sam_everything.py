"""Benchmark (not a test): segment everything beside segment-anything's own automatic mask generator.

    .venv/bin/python bench/sam_everything.py [--models tiny_sam,sam_vit_b] [--points-per-side 16] [--rounds 3]

On a 640x480 photo (scikit-image's coffee, resized), for each model on PyTorch (random weights
when none are on this machine: the network's size is what is timed): the encoder once, then
``SamRunner.segment_everything`` on the cached embedding, and ``SamAutomaticMaskGenerator`` on the
same network with the same grid and thresholds; its ``generate`` runs the encoder again, so
its figure is ``generate`` minus one ``set_image``, both timed in the same round. Rounds
alternate the two; figures are medians. Prints the ratio vfm / segment-anything.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE_SIZE = (480, 640)  # (height, width)


def photo() -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize(IMAGE_SIZE[::-1], Image.BILINEAR))


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def bench(name: str, points_per_side: int, rounds: int) -> tuple[float, float, float, int]:
    from segment_anything import SamAutomaticMaskGenerator

    from vfm.models import load_model
    from vfm.models.weights import WeightsUnavailable

    try:
        runner = load_model(name, device="cpu")
    except WeightsUnavailable:
        runner = load_model(name, device="cpu", weights="random")
    image = photo()
    embedding = runner.encode([image])[0]
    encoder = seconds(lambda: runner.encode([image]))
    generator = SamAutomaticMaskGenerator(runner.model, points_per_side=points_per_side)
    ours, theirs, found = [], [], []
    for _ in range(rounds):
        ours.append(seconds(lambda: found.append(runner.segment_everything(embedding,
                                                                          points_per_side=points_per_side))))
        whole = seconds(lambda: generator.generate(image))
        theirs.append(whole - seconds(lambda: generator.predictor.set_image(image)))
    return encoder, statistics.median(ours), statistics.median(theirs), len(found[-1].masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_sam", help="comma-separated SAM models (sam_vit_b: minutes on CPU)")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"segment everything, {args.points_per_side}x{args.points_per_side} points, "
          f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} photo, CPU, median of {args.rounds}")
    print(f"{'model':<12} {'encoder s':>10} {'vfm s':>8} {'SAM AMG s':>10} {'vfm/AMG':>8} {'masks':>6}")
    for name in args.models.split(","):
        encoder, ours, theirs, found = bench(name, args.points_per_side, args.rounds)
        print(f"{name:<12} {encoder:>10.3f} {ours:>8.3f} {theirs:>10.3f} {ours / theirs:>8.2f} {found:>6}")


if __name__ == "__main__":
    main()

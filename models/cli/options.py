"""The task options of `vfm predict`, checked the way the runners and the service check them."""
from __future__ import annotations

import argparse
import math
from typing import Any

from vfm.models.errors import UsageError

TASKS = ("classify", "detect", "embed", "segment")
# The --everything options (EverythingOptions' fields; defaults there).
EVERYTHING_FLAGS = (
    ("--points-per-side", int, "grid points per side (default 32)"),
    ("--points-per-batch", int, "grid points per decoder call (default 64)"),
    ("--pred-iou-thresh", float, "keep masks whose predicted IoU is above this (default 0.88)"),
    ("--stability-score-thresh", float, "keep masks at least this stable (default 0.95)"),
    ("--nms-thresh", float, "no two masks overlap (mask IoU) above this (default 0.7)"),
    ("--min-mask-area", int, "drop masks of fewer pixels (default 0)"),
    ("--max-mask-fraction", float, "drop masks covering more than this fraction of the image (default 0.95)"),
    ("--max-masks", int, "at most this many masks, largest first"),
)
DETECT_KEYS = ("score_threshold", "iou_threshold", "max_detections")


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if len(values) not in n or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{what} {text!r} needs {' or '.join(map(str, n))} finite numbers")
    return values


def prompt_from_args(args: argparse.Namespace):
    """--point/--box -> a models.results.Prompt (None when neither is given)."""
    import numpy as np

    from ..results import Prompt

    points, labels = [], []
    for text in args.point:
        values = _floats(text, (2, 3), "--point")
        points.append(values[:2])
        labels.append(int(values[2]) if len(values) == 3 else 1)
    box = np.asarray(_floats(args.box, (4,), "--box"), np.float32) if args.box else None
    if not points and box is None:
        return None
    return Prompt(points=np.asarray(points, np.float32) if points else None,
                  point_labels=np.asarray(labels, np.int64) if points else None, box=box, multimask=args.multimask)


def task_options(task: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave for ``task`` (None: the server decides the task), checked."""
    opts: dict[str, Any] = {}
    if args.everything and task != "segment":
        raise UsageError(f"--everything segments; it does not go with --task {task}")
    if task in ("classify", None) and args.top_k is not None:
        if args.top_k < 1:
            raise UsageError("--top-k must be at least 1")
        opts["top_k"] = args.top_k
    if task in ("detect", None):
        for key in ("score_threshold", "iou_threshold"):
            value = getattr(args, key)
            if value is not None:
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise UsageError(f"--{key.replace('_', '-')} must be between 0 and 1")
                opts[key] = value
        if args.max_detections is not None:
            if args.max_detections < 1:
                raise UsageError("--max-detections must be at least 1")
            opts["max_detections"] = args.max_detections
    if task == "embed" and args.normalize:
        opts["normalize"] = True
    if task == "segment" and args.everything:
        return {"mode": "everything", **everything_options(args)}
    if task == "segment":
        prompt = prompt_from_args(args)
        if prompt is None:
            raise UsageError("segment needs a prompt: --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
        if prompt.points is not None:
            opts["points"] = prompt.points.tolist()
            opts["point_labels"] = prompt.point_labels.tolist()
        if prompt.box is not None:
            opts["box"] = prompt.box.tolist()
        opts["multimask"] = bool(prompt.multimask)
    return opts


def everything_options(args: argparse.Namespace) -> dict[str, Any]:
    """The --everything options the user gave, checked as ``EverythingOptions`` checks them."""
    from ..families.sam_everything import EverythingOptions

    if args.point or args.box or args.multimask:
        raise UsageError("--everything takes no prompt: leave out --point, --box and --multimask")
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in EVERYTHING_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        EverythingOptions(**given)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    return given


def detect_segment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--detector``: the detect options, ``multimask``, and no hand-made prompt."""
    if args.task not in (None, "segment"):
        raise UsageError(f"--detector segments what the detector finds; it does not go with --task {args.task}")
    if args.point or args.box:
        raise UsageError("--detector makes the prompts from its boxes; drop --point/--box")
    return {**task_options("detect", args), "detector": args.detector, "multimask": bool(args.multimask)}

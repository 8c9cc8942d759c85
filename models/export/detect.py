"""Export torchvision detectors (Faster R-CNN, RetinaNet, SSD, tiny_detector): one image in, named outputs.

The graph takes one image ``[3, H, W]`` float in [0, 1] of any height and width and returns the
model's own output dict, named by its keys (Faster R-CNN says boxes, labels, scores; SSD says
boxes, scores, labels). The model's resize, anchors, box decoding and NMS are in the graph.

The thresholds the torch runner sets per call cannot change inside a traced graph, so the
graph is traced with the loosest settings and the shared ``families.detection.finalize`` applies
the caller's (score threshold, class-aware NMS, max detections), as it does for every
detector. Loosest means: scores above ``min_score`` (callers may not ask for less), NMS off
(IoU 1.0), and the best ``max_candidates`` per image. The answer is then the torch runner's,
except that a box ranked past ``max_candidates`` among the scores above ``min_score`` is lost.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..families.detection import DetectArgs, image_tensor, set_postprocess
from .common import (ExportError, FamilyExport, Parity, ParityError, Tolerance, export_graph,
                            parity_images, parity_session)

log = logging.getLogger(__name__)

DEFAULT_MIN_SCORE = 0.05       # torchvision's own default box_score_thresh
DEFAULT_MAX_CANDIDATES = 1000
NMS_OFF = 1.0                  # IoU never exceeds 1, so nothing is suppressed
SCORE_MARGIN = 1e-3            # detections this close to a cut-off may fall either side of it
RESIZE_CHECK_SIZES = 40        # random image sizes the traced resize is checked on (cheap: no network)
# Detections of an image that may differ through exact ties (see compare_detections): 10%, at
# least 4, since with NMS off one swapped proposal carries one detection per class above min_score.
TIE_SHARE, TIE_MINIMUM = 0.1, 4


@contextlib.contextmanager
def float64_resize() -> Iterator[None]:
    """Trace torchvision's detection resize with its size arithmetic in float64, as eager PyTorch does it.

    Eager PyTorch computes ``floor(side * min(min_size / short, max_size / long))`` in Python
    floats; torchvision's tracing branch does it in float32, which for many sizes is one pixel
    short (200x200 -> 159x159 instead of 160x160) and changes every detection. The legacy
    exporter also turns 0-dim float64 tensors into float32, so the values stay 1-d here.
    """
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.models.detection import transform as tv_transform

    original = tv_transform._resize_image_and_masks

    def resize(image: Any, self_min_size: float, self_max_size: float, target: Any = None,
               fixed_size: Any = None) -> tuple[Any, Any]:
        if fixed_size is not None or not torchvision._is_tracing():
            return original(image, self_min_size, self_max_size, target, fixed_size)
        if target is not None:
            raise ExportError("the export traces detectors for inference only (no targets).")
        shape = tv_transform._get_shape_onnx(image).to(torch.float64)
        extremes = torch.cat([torch.amin(shape, dim=0, keepdim=True), torch.amax(shape, dim=0, keepdim=True)])
        bounds = torch.tensor([float(self_min_size), float(self_max_size)], dtype=torch.float64)
        scale = torch.amin(bounds / extremes, dim=0, keepdim=True)
        size = torch.floor(shape * scale).to(torch.int64)
        # bilinear to that size is what interpolate(scale_factor, recompute_scale_factor=True) does
        return F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0], None

    tv_transform._resize_image_and_masks = resize
    try:
        yield
    finally:
        tv_transform._resize_image_and_masks = original


def merge_levels(levels: Any, unmerged_results: list[Any]) -> Any:
    """RoIs pooled per pyramid level, put back in RoI order: a row gather by the inverse permutation.

    torchvision's ``_onnx_merge_levels`` scatters each level's rows into a zero tensor with a 4-D index
    as large as the data (``ScatterElements``): for Faster R-CNN's 1000 RoIs x 256 x 7 x 7 that is 91 ms
    of ONNX Runtime's ~2 s at batch 1, where eager PyTorch's ``index_put_`` takes 5 ms. The rows of the
    levels' concatenation are the RoIs in level order; one scatter on the 1-D RoI indices inverts that
    order and one ``Gather`` on axis 0 copies whole rows. Same values, same order.
    """
    import torch

    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.numel(), dtype=order.dtype))
    return torch.cat(unmerged_results)[inverse]


@contextlib.contextmanager
def gather_merge_levels() -> Iterator[None]:
    """Trace ``MultiScaleRoIAlign`` with ``merge_levels`` in place of torchvision's scatter."""
    from torchvision.ops import poolers

    original = poolers._onnx_merge_levels
    poolers._onnx_merge_levels = merge_levels
    try:
        yield
    finally:
        poolers._onnx_merge_levels = original


def _one_image(model: Any, keys: list[str]) -> Any:
    from torch import nn

    class OneImageDetector(nn.Module):
        # torchvision detectors take a list of images and return a list of dicts; a graph needs tensors
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: Any) -> tuple[Any, ...]:
            out = self.model([image])[0]
            return tuple(out[k] for k in keys)

    return OneImageDetector().eval()


def export_torchvision_detector(runner: Any, folder: Path, opset: int, tolerance: Tolerance,
                                external_data: bool | None, seed: int, min_score: float = DEFAULT_MIN_SCORE,
                                max_candidates: int = DEFAULT_MAX_CANDIDATES) -> FamilyExport:
    """``TorchvisionDetector`` -> ``model.onnx``: ``image`` [3, H, W] -> the model's outputs [K, ...]."""
    import torch

    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0.0 <= min_score < 1.0:
        raise ExportError(f"min_score must be a number in [0, 1), got {min_score!r}.")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ExportError(f"max_candidates must be a whole number >= 1, got {max_candidates!r}.")
    set_postprocess(runner.model, DetectArgs(float(min_score), NMS_OFF, int(max_candidates)))
    example = torch.from_numpy(image_tensor(parity_images(seed + 1000, [(240, 320)])[0]))
    with torch.no_grad():
        keys = list(runner.model([example])[0].keys())  # the model's own names, in its own order
    for needed in ("boxes", "scores", "labels"):
        if needed not in keys:
            raise ExportError(f"{runner.name}: the model's output has no {needed!r} (it has {keys}).")
    module = _one_image(runner.model, keys)
    axes = {"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in keys}}
    with float64_resize(), gather_merge_levels():
        graph = export_graph(module, (example,), folder, "model", ["image"], keys, axes, opset, external_data)
    session = parity_session(folder / graph.file)
    parity = Parity(tolerance)
    if getattr(runner.model.transform, "fixed_size", None) is None:  # SSD resizes to one fixed size
        check_resize(runner.model.transform, folder, opset, parity, seed)
    for image in parity_images(seed):
        x = image_tensor(image)
        got = dict(zip(keys, session.run(keys, {"image": x})))
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in zip(keys, module(torch.from_numpy(x)))}
        compare_detections(parity, got, ref, image.shape[:2], min_score, max_candidates)
    if parity.counts.get("detections_compared", 0) == 0:
        raise ParityError(f"parity: {runner.name} found no detections above min_score {min_score} on any parity "
                          "image, so the comparison would prove nothing; export with a lower min_score.")
    return FamilyExport(kind="torchvision_detector", graphs=[graph], parity=parity.to_json(),
                        runtime={"input": "image", "outputs": keys, "min_score": float(min_score),
                                 "max_candidates": int(max_candidates)},
                        labels=list(runner.labels))


def check_resize(transform: Any, folder: Path, opset: int, parity: Parity, seed: int) -> None:
    """The traced normalise + resize + pad against eager PyTorch on many random sizes.

    Which sizes a rounding difference hits is a matter of arithmetic, not of the network, so
    this checks the size logic on far more sizes than the full-network parity can afford.
    """
    import torch
    from torch import nn

    class Preprocess(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = transform

        def forward(self, image: Any) -> Any:
            return self.transform([image])[0].tensors

    module = Preprocess().eval()
    scratch = folder / ".resize_check"
    example = torch.rand(3, 240, 320)
    with float64_resize():
        graph = export_graph(module, (example,), scratch, "resize", ["image"], ["batch"],
                             {"image": {1: "height", 2: "width"}, "batch": {2: "out_height", 3: "out_width"}}, opset)
    session = parity_session(scratch / graph.file)
    rng = np.random.default_rng(seed + 7)
    try:
        for height, width in rng.integers(16, 900, (RESIZE_CHECK_SIZES, 2)):
            x = rng.random((3, int(height), int(width)), dtype=np.float32)
            (got,) = session.run(["batch"], {"image": x})
            with torch.no_grad():
                ref = module(torch.from_numpy(x)).numpy()
            if got.shape != ref.shape:
                raise ParityError(f"parity: the detector's resize gives {got.shape[2:]} in ONNX Runtime and "
                                  f"{ref.shape[2:]} in PyTorch for a {height}x{width} image.")
            parity.tensor("resized_input", got, ref)
            parity.count("resize_sizes_checked")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare_detections(parity: Parity, got: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                       image_size: tuple[int, int], min_score: float, max_candidates: int) -> None:
    """Every detection clear of the cut-offs must be in both outputs: same label, box and score within tolerance.

    Detections are matched by label and nearest box rather than by position, since two boxes
    with nearly equal scores may come out in either order. A few detections per image may go
    unmatched: padding gives anchors bit-identical scores, PyTorch's and ONNX Runtime's top-k
    break such exact ties differently, and the proposal that wins differs. A wrong graph (a
    resize one pixel off, a baked shape) changes most detections of an image, far past that.
    """
    tol = parity.tolerance
    box_limit = tol.box_atol_px + tol.box_rtol * max(image_size)
    floor = min_score
    for out in (got, ref):
        if len(out["scores"]) >= max_candidates:  # the cap cut somewhere: near its last score is a coin toss
            floor = max(floor, float(np.min(out["scores"])))
    floor += SCORE_MARGIN
    used = np.zeros(len(got["scores"]), bool)
    unmatched_ref = 0
    for i in np.argsort(-ref["scores"], kind="stable"):
        if ref["scores"][i] < floor:
            continue
        candidates = np.flatnonzero((got["labels"] == ref["labels"][i]) & ~used)
        dist = np.max(np.abs(got["boxes"][candidates] - ref["boxes"][i]), axis=1) if len(candidates) else []
        if len(candidates) == 0 or float(np.min(dist)) > box_limit:
            unmatched_ref += 1
            continue
        j = candidates[int(np.argmin(dist))]
        used[j] = True
        box_diff, score_diff = float(np.min(dist)), abs(float(got["scores"][j]) - float(ref["scores"][i]))
        if score_diff > tol.score_atol:
            raise ParityError(f"parity: a detection's score differs by {score_diff:.3g} between ONNX Runtime and "
                              f"PyTorch on a {image_size[0]}x{image_size[1]} image (limit {tol.score_atol:g}).")
        parity.worst("box_max_abs_diff_px", box_diff)
        parity.worst("score_max_abs_diff", score_diff)
        parity.count("detections_compared")
    unmatched_got = int(np.sum(~used & (got["scores"] >= floor)))
    compared = int(np.sum(ref["scores"] >= floor))
    allowed = max(TIE_MINIMUM, int(TIE_SHARE * compared))
    if unmatched_ref > allowed or unmatched_got > allowed:
        raise ParityError(f"parity: on a {image_size[0]}x{image_size[1]} image {unmatched_ref} of {compared} PyTorch "
                          f"detections have no ONNX Runtime detection of the same label within {box_limit:.3g} px, "
                          f"and {unmatched_got} ONNX Runtime detections none in PyTorch (at most {allowed} allowed).")
    parity.count("detections_unmatched", max(unmatched_ref, unmatched_got))

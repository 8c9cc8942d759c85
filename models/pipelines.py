"""Detect, then segment: a detector's boxes become a SAM's box prompts (e.g. ``mtcnn_faces`` -> face masks).

    >>> faces = load_model("mtcnn_faces")
    >>> sam = load_model("tiny_sam")
    >>> found = detect_then_segment(faces, sam, [image])[0]
    >>> found.detections[0].label, found.masks[0].masks.shape     # one mask per box, at the image's size
    ('face', (1, 512, 512))

Two runners, no new network: the detector runs once over all images (its own batching), the SAM
encoder once over the images that have detections, and every image's boxes go to the decoder in
one ``segment`` call (box prompts all have two points, so they share one decoder batch; see
``families.sam_prompts``). The service does the same over its deployments; ``merge_json`` is the
answer shape both give.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .results import Detection, Masks, Prompt
from .runner import Runner, UnsupportedTask


@dataclass
class SegmentedDetections:
    """One image's detections, each with the masks SAM gives for its box (``masks[i]`` is ``detections[i]``'s)."""

    detections: list[Detection]
    masks: list[Masks]
    image_size: tuple[int, int]               # (height, width)

    def to_json(self, fmt: str = "rle") -> dict[str, Any]:
        """``{"image_size", "detections": [{box, score, label, index, ..., "masks": [...]}]}``; masks as ``fmt``."""
        return {"image_size": {"height": int(self.image_size[0]), "width": int(self.image_size[1])},
                "detections": merge_json([d.to_json() for d in self.detections],
                                         [m.to_json(fmt)["masks"] for m in self.masks])}


def merge_json(detections: Sequence[dict[str, Any]], masks: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each detection's JSON with its masks' JSON under ``"masks"`` (the HTTP answer and ``to_json`` alike)."""
    if len(detections) != len(masks):
        raise ValueError(f"{len(detections)} detections but {len(masks)} mask lists; they must pair up.")
    return [{**detection, "masks": list(found)} for detection, found in zip(detections, masks)]


def box_prompt(box: Sequence[float], multimask: bool = False) -> Prompt:
    """The SAM prompt of one detection box [x0, y0, x1, y1] (pixels of the original image)."""
    return Prompt(box=np.asarray(box, np.float64).reshape(4), multimask=multimask)


def check_pair(detector: Runner, segmenter: Runner) -> None:
    """``UnsupportedTask`` unless ``detector`` detects and ``segmenter`` is a promptable SAM."""
    if "detect" not in detector.tasks:
        raise UnsupportedTask(f"Model {detector.name!r} is not a detector (it does {', '.join(detector.tasks)}); "
                              "detect-then-segment needs one, e.g. mtcnn_faces or tiny_detector.")
    if "segment" not in segmenter.tasks:
        raise UnsupportedTask(f"Model {segmenter.name!r} is not a SAM (it does {', '.join(segmenter.tasks)}); "
                              "detect-then-segment needs one, e.g. tiny_sam.")


def detect_then_segment(detector: Runner, segmenter: Runner, images: Sequence[np.ndarray], *,
                        score_threshold: float = 0.5, iou_threshold: float = 0.5, max_detections: int = 100,
                        multimask: bool = False) -> list[SegmentedDetections]:
    """For each image, ``detector``'s boxes (with its usual options) and ``segmenter``'s masks for them.

    An image without detections gets an empty list and costs no SAM call. ``multimask`` gives
    three masks per box instead of one. Bad options are the detector's ``ValueError``.
    """
    check_pair(detector, segmenter)
    found = detector.detect(images, score_threshold=score_threshold, iou_threshold=iou_threshold,
                            max_detections=max_detections)
    with_boxes = [i for i, result in enumerate(found) if result.detections]
    embeddings = dict(zip(with_boxes, segmenter.encode([images[i] for i in with_boxes])))
    out = []
    for i, result in enumerate(found):
        masks: list[Masks] = []
        if i in embeddings:
            masks = segmenter.segment(embeddings[i], [box_prompt(d.box, multimask) for d in result.detections])
        out.append(SegmentedDetections(detections=list(result.detections), masks=masks,
                                       image_size=result.image_size))
    return out

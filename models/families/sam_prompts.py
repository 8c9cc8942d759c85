"""SAM prompts -> the arrays the prompt encoder takes, the way ``SamOnnxModel`` takes them.

Backend-neutral (numpy only) so the PyTorch runner and an ONNX Runtime runner pack prompts
identically. Every prompt becomes a row of points in model-input pixels with a label each:

- ``0`` background point, ``1`` foreground point,
- ``2`` / ``3`` the top-left / bottom-right corner of a box,
- ``-1`` a padding point at (0, 0); a prompt without a box gets one, as ``SamPredictor`` does.

Prompts are grouped by their number of points: SAM's two-way transformer has no attention
mask, so an extra padding token changes every output a little (it is one more key in each
softmax). Padding all prompts to the longest one would make a prompt's masks depend on the
other prompts in the same call; grouping keeps every prompt exactly as ``SamPredictor`` sees
it, and each group is still one batched decoder call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..results import ImageEmbedding, Prompt

PADDING_LABEL = -1
BOX_TOP_LEFT_LABEL = 2
BOX_BOTTOM_RIGHT_LABEL = 3


@dataclass
class PromptGroup:
    """Prompts with the same number of points, stacked for one prompt-encoder + decoder call."""

    indices: list[int]           # where each row's prompt sits in the caller's list
    coords: np.ndarray           # [B, N, 2] float32 (x, y) in model-input pixels (after the resize)
    labels: np.ndarray           # [B, N] float32 in {-1, 0, 1, 2, 3}
    multimask: list[bool]        # per row: three masks, or one


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``long_side`` (``ResizeLongestSide``'s rounding)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_float_array(value: object, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be numbers, got {value!r:.80}.") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: {what} must be finite numbers, got {arr.tolist()!r:.120}.")
    return arr


def validate_prompt(prompt: Prompt, image_size: tuple[int, int], where: str = "prompt"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check one prompt against an image of ``image_size`` = (height, width).

    Returns ``(points [P, 2], labels [P], box [4] or None)`` in original-image pixels, float64.
    Points must lie on the image (0 <= x <= width, 0 <= y <= height): a click outside is a
    client bug, most often swapped x and y, and is rejected. A box may spill over the image
    (detector boxes often do by a pixel or two) and is clipped to it; a box with no part on
    the image is rejected. Raises ``ValueError`` with a message that starts with ``where``.
    """
    if not isinstance(prompt, Prompt):
        raise ValueError(f"{where}: expected a Prompt, got {type(prompt).__name__}.")
    height, width = image_size
    points = np.zeros((0, 2))
    labels = np.zeros((0,))
    if prompt.points is not None:
        points = _as_float_array(prompt.points, "points", where)
        if points.size == 0:  # `"points": []` next to a box means no points
            points = points.reshape(0, 2)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"{where}: points must be a list of [x, y] pairs, got shape {points.shape}.")
        if prompt.point_labels is None and len(points):
            raise ValueError(f"{where}: points need point_labels (1 foreground, 0 background), one per point.")
    if prompt.point_labels is not None:
        labels = _as_float_array(prompt.point_labels, "point_labels", where).reshape(-1)
        if len(labels) != len(points):
            raise ValueError(f"{where}: {len(labels)} point_labels for {len(points)} points; give one label "
                             "per point.")
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError(f"{where}: point_labels must be 1 (foreground) or 0 (background), got "
                             f"{labels.tolist()}.")
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    if np.any(outside):
        bad = points[outside][0].tolist()
        raise ValueError(f"{where}: point {bad} is outside the {width}x{height} (width x height) image; "
                         "points are [x, y] pixels of the original image.")
    box = None
    if prompt.box is not None:
        box = _as_float_array(prompt.box, "box", where).reshape(-1)
        if box.shape != (4,):
            raise ValueError(f"{where}: box must be [x0, y0, x1, y1], got {box.size} numbers.")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{where}: box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, "
                             f"got {box.tolist()}.")
        box = np.clip(box, 0, [width, height, width, height])
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{where}: box {np.asarray(prompt.box).tolist()} has no part on the "
                             f"{width}x{height} (width x height) image.")
    if len(points) == 0 and box is None:
        raise ValueError(f"{where}: a prompt needs at least one point or a box.")
    return points, labels, box


def prompt_points(points: np.ndarray, labels: np.ndarray, box: np.ndarray | None,
                  image_size: tuple[int, int], long_side: int) -> tuple[np.ndarray, np.ndarray]:
    """One validated prompt as (coords [N, 2], labels [N]) in model-input pixels."""
    height, width = image_size
    new_h, new_w = preprocess_shape(height, width, long_side)
    scale = np.array([new_w / width, new_h / height])
    coords = [points * scale]
    all_labels = [labels]
    if box is not None:
        coords.append(box.reshape(2, 2) * scale)
        all_labels.append(np.array([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], dtype=np.float64))
    else:
        coords.append(np.zeros((1, 2)))
        all_labels.append(np.array([PADDING_LABEL], dtype=np.float64))
    return (np.concatenate(coords).astype(np.float32), np.concatenate(all_labels).astype(np.float32))


def pack_prompts(prompts: Sequence[Prompt], image_size: tuple[int, int], long_side: int) -> list[PromptGroup]:
    """Validate every prompt, then group them by number of points (see the module docstring).

    All prompts are checked before any is packed, so a bad prompt fails the whole call.
    """
    rows: dict[int, list[tuple[int, np.ndarray, np.ndarray, bool]]] = {}
    for i, prompt in enumerate(prompts):
        points, labels, box = validate_prompt(prompt, image_size, where=f"prompt {i}")
        coords, point_labels = prompt_points(points, labels, box, image_size, long_side)
        rows.setdefault(len(coords), []).append((i, coords, point_labels, bool(prompt.multimask)))
    return [PromptGroup(indices=[r[0] for r in group], coords=np.stack([r[1] for r in group]),
                        labels=np.stack([r[2] for r in group]), multimask=[r[3] for r in group])
            for group in rows.values()]


def check_embedding(embedding: ImageEmbedding, model: str, img_size: int, embedding_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``embedding`` came from ``model``'s encoder and its sizes fit it
    (shared by the PyTorch and ONNX runners, which then convert the features each their own way)."""
    if not isinstance(embedding, ImageEmbedding):
        raise ValueError(f"segment() needs an ImageEmbedding from encode(), got {type(embedding).__name__}.")
    if embedding.model and embedding.model != model:
        raise ValueError(f"This embedding was made by {embedding.model!r}; encode the image with {model!r} first.")
    shape = tuple(getattr(embedding.features, "shape", ()))
    expected = (1, *embedding_shape)
    if shape != expected:
        raise ValueError(f"Embedding features have shape {shape}; {model} needs {expected}.")
    height, width = (int(v) for v in embedding.original_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"Embedding original_size {embedding.original_size} is not a (height, width) size.")
    if tuple(embedding.input_size) != preprocess_shape(height, width, img_size):
        raise ValueError(f"Embedding input_size {tuple(embedding.input_size)} does not match its original_size "
                         f"{(height, width)} for {model} (expected {preprocess_shape(height, width, img_size)}).")

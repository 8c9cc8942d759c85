"""Export SAM as two graphs: the image encoder and a prompt decoder that is right for any aspect ratio.

- ``encoder.onnx``: ``image`` [B, 3, S, S] (resized, normalised, zero-padded) -> ``image_embeddings``
  [B, 256, S/16, S/16]. segment-anything ships no encoder export; this is it.
- ``decoder.onnx``: ``image_embeddings`` [1, 256, h, w], ``point_coords`` [P, N, 2] (model-input
  pixels) and ``point_labels`` [P, N] (-1 pad, 0/1 points, 2/3 box corners) -> ``low_res_masks``
  [P, 4, 4h, 4w] and ``iou_predictions`` [P, 4], for P prompts of N points each.

The decoder graph is the module the PyTorch backend calls (``prompt_decoder_module`` in
``families.sam``: ``embed_points`` and ``MaskDecoder.predict_masks``), with nothing that depends
on the image's size, which stays in ``SamRunner``. Parity runs the runner on PyTorch and on the
new graphs end to end on square, portrait and landscape images and compares embeddings,
low-res logits, predicted IoU and the final masks (IoU).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..families.sam import from_export, prompt_decoder_module, sam_runtime
from ..results import Prompt
from .common import FamilyExport, Parity, ParityError, Tolerance, export_graph, mask_iou, parity_images

log = logging.getLogger(__name__)

# square, portrait, landscape (and a strongly landscape one): the crop differs for each
SAM_PARITY_SIZES: tuple[tuple[int, int], ...] = ((300, 300), (400, 240), (150, 420))


def parity_prompts(rng: np.random.Generator, height: int, width: int) -> list[Prompt]:
    """A point, a point with three masks, a foreground + background pair, a box, and a box with a point."""
    def point() -> list[float]:
        return [float(rng.uniform(0, width)), float(rng.uniform(0, height))]

    x0, x1 = sorted(rng.uniform(0, width, 2))
    y0, y1 = sorted(rng.uniform(0, height, 2))
    box = np.array([x0, y0, x1 + 1.0, y1 + 1.0])
    return [Prompt(points=np.array([point()]), point_labels=np.array([1])),
            Prompt(points=np.array([point()]), point_labels=np.array([1]), multimask=True),
            Prompt(points=np.array([point(), point()]), point_labels=np.array([1, 0])),
            Prompt(box=box),
            Prompt(points=np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]), point_labels=np.array([1]), box=box,
                   multimask=True)]


def export_sam(runner: Any, folder: Path, opset: int, tolerance: Tolerance, external_data: bool | None,
               seed: int) -> FamilyExport:
    """``SamRunner`` -> encoder.onnx + decoder.onnx, checked end to end against the PyTorch runner."""
    import torch

    sam = runner.model.float().eval()
    runtime = sam_runtime(sam).to_json()
    size = runtime["img_size"]
    channels, emb_h, emb_w = runtime["embedding_shape"]
    encoder = export_graph(sam.image_encoder, (torch.randn(1, 3, size, size),), folder, "encoder", ["image"],
                           ["image_embeddings"], {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}, opset,
                           external_data)
    example = (torch.randn(1, channels, emb_h, emb_w), torch.rand(2, 3, 2) * size,
               torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]]))
    decoder = export_graph(prompt_decoder_module(sam), example, folder, "decoder",
                           ["image_embeddings", "point_coords", "point_labels"], ["low_res_masks", "iou_predictions"],
                           {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
                            "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}, opset, external_data)
    parity = check_sam_parity(runner, folder, runtime, tolerance, seed)
    return FamilyExport(kind="sam", graphs=[encoder, decoder], parity=parity, runtime=runtime)


def check_sam_parity(runner: Any, folder: Path, runtime: dict[str, Any], tolerance: Tolerance, seed: int
                     ) -> dict[str, Any]:
    """The ONNX runner on the new graphs against ``runner``: embeddings, low-res logits, IoU scores, masks."""
    from ..backends.onnx import OnnxSession, SessionSettings

    parity = Parity(tolerance, sizes=SAM_PARITY_SIZES)
    rng = np.random.default_rng(seed)
    images = parity_images(seed, SAM_PARITY_SIZES)
    # One image at a time, PyTorch before ONNX Runtime opens its sessions, and no ORT arena: a full-size encoder's
    # global attention holds GBs per image, which a batch of three and an arena that keeps it made the export's peak.
    torch_embeddings = [runner.encode([image])[0] for image in images]
    settings = SessionSettings(device="cpu")
    no_arena = {"enable_cpu_mem_arena": False, "enable_mem_pattern": False}
    sessions = {k: OnnxSession(folder / f"{k}.onnx", settings, no_arena) for k in ("encoder", "decoder")}
    onnx_runner = from_export(runner.spec, sessions, {"runtime": runtime}, folder.parent, "cpu")
    ort_embeddings = [onnx_runner.encode([image])[0] for image in images]
    for image, got, ref in zip(images, ort_embeddings, torch_embeddings):
        parity.tensor("image_embeddings", got.features, ref.features)
        prompts = parity_prompts(rng, *image.shape[:2])
        for prompt, a, b in zip(prompts, onnx_runner.segment(got, prompts), runner.segment(ref, prompts)):
            parity.tensor("low_res_logits", a.low_res_logits, b.low_res_logits)
            parity.tensor("iou_predictions", a.scores, b.scores)
            if a.masks.shape != b.masks.shape or a.masks.shape[1:] != image.shape[:2]:
                raise ParityError(f"parity: masks of shape {a.masks.shape} (ONNX Runtime) and {b.masks.shape} "
                                  f"(PyTorch) for a {image.shape[0]}x{image.shape[1]} image.")
            for mask_a, mask_b in zip(a.masks, b.masks):
                iou = mask_iou(mask_a, mask_b)
                if not iou >= tolerance.min_iou:
                    raise ParityError(f"parity: a mask of ONNX Runtime and PyTorch overlap with IoU {iou:.4f} on a "
                                      f"{image.shape[0]}x{image.shape[1]} image (at least {tolerance.min_iou} "
                                      "needed); the export is not published.")
                parity.worst("mask_iou_min", iou, lowest=True)
                parity.count("masks_compared")
    return parity.to_json()

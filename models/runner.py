"""The runner interface every family implements, and ``load_model``.

A runner takes decoded RGB uint8 images (HxWx3 numpy arrays) and returns plain result
objects (``vfm.models.results``). It knows nothing of Ray, HTTP or training.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from .registry import ModelSpec, get_spec
from .results import Classification, Detections, ImageEmbedding, Masks, Prompt

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]


class UnsupportedTask(ValueError):
    """A task method called on a model that does not have it (e.g. ``detect`` on a classifier)."""


class Runner:
    """Base class: a loaded model and its task methods. Families override what they support."""

    spec: ModelSpec
    backend: str = "torch"
    device: str = "cpu"
    weights_path: Path | None = None

    def __init__(self, spec: ModelSpec, device: str = "cpu", weights_path: Path | None = None):
        self.spec = spec
        self.device = device
        self.weights_path = weights_path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    def _unsupported(self, task: str):
        return UnsupportedTask(f"Model {self.name!r} does not {task}; it supports: {', '.join(self.tasks)}.")

    # ---- task methods (lists in, lists out) -------------------------------------------
    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[Classification]:
        raise self._unsupported("classify")

    def embed(self, images: Sequence[np.ndarray], normalize: bool = False) -> np.ndarray:
        """[N, D] float32 features (pooled penultimate layer / CLS token)."""
        raise self._unsupported("embed")

    def detect(self, images: Sequence[np.ndarray], score_threshold: float = 0.5, iou_threshold: float = 0.5,
               max_detections: int = 100) -> list[Detections]:
        raise self._unsupported("detect")

    def encode(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """SAM: one image embedding per image."""
        raise self._unsupported("encode")

    def segment(self, embedding: ImageEmbedding, prompts: Sequence[Prompt]) -> list[Masks]:
        """SAM: masks for several prompts on one embedding, in one batched decoder call."""
        raise self._unsupported("segment")

    # ---- lifecycle ----------------------------------------------------------------------
    def warmup(self) -> None:
        """One small inference so the first request does not pay for lazy initialisation."""
        img = np.full((64, 96, 3), 127, np.uint8)
        if "classify" in self.tasks:
            self.classify([img], top_k=1)
        elif "embed" in self.tasks:
            self.embed([img])
        elif "detect" in self.tasks:
            self.detect([img])
        elif "segment" in self.tasks:
            emb = self.encode([img])[0]
            self.segment(emb, [Prompt(points=np.array([[10.0, 10.0]]), point_labels=np.array([1]))])

    def info(self) -> dict[str, Any]:
        out = self.spec.to_json()
        out.update(backend=self.backend, device=self.device,
                   weights_path=str(self.weights_path) if self.weights_path else None,
                   labels=list(self.spec.labels) if self.spec.labels else None)
        return out


def load_model(name: str, backend: Backend = "torch", device: str = "auto", weights: str | Path | None = None,
               **options: Any) -> Runner:
    """Build the runner of a registered model.

    ``weights`` overrides the spec's default source (local path, ``hf:...``, ``https://...#sha256=``).
    ``options`` go to the family builder (e.g. ``dtype="float16"`` on CUDA).
    """
    from .backends.torch import resolve_device
    from .weights import resolve_weights

    spec = get_spec(name)
    if backend == "torch":
        path = resolve_weights(name, spec.weights, weights)
        runner = spec.builder(spec, path, resolve_device(device), **options)
    elif backend == "onnx":
        from .backends.onnx import load_onnx_runner  # issue 4: ONNX Runtime backend

        runner = load_onnx_runner(spec, device=device, weights=weights, **options)
    else:
        raise ValueError(f"Unknown backend {backend!r}; use 'torch' or 'onnx'.")
    log.info("loaded %s (%s on %s)", name, runner.backend, runner.device)
    return runner

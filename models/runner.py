"""The runner interface every family implements.

A runner takes decoded RGB uint8 images (HxWx3 numpy arrays) and returns plain result
objects (``vfm.models.results``). It holds the network(s) it calls (``vfm.models.network``),
a PyTorch module or an ONNX Runtime session, chosen by ``load_model`` (``vfm.models.loading``).
It knows nothing of Ray, HTTP or training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .network import Network
from .results import Classification, Detections, ImageEmbedding, Masks, Prompt
from .spec import ModelSpec


class UnsupportedTask(ValueError):
    """A task method called on a model that does not have it (e.g. ``detect`` on a classifier)."""


class Runner:
    """Base class: a loaded model and its task methods. Families override what they support.

    ``networks``: what the runner calls, by role ("model"; SAM "encoder"/"decoder"; MTCNN
    "pnet"/"rnet"/"onet"). ``export``: the config.json of the ONNX export the networks came
    from (None on PyTorch), shown by ``info()``.
    """

    def __init__(self, spec: ModelSpec, networks: Mapping[str, Network], device: str = "cpu",
                 weights_path: Path | None = None, export: dict[str, Any] | None = None):
        self.spec = spec
        self.networks = dict(networks)
        self.device = device
        self.weights_path = weights_path
        self.export = export

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    @property
    def backend(self) -> str:
        return next(iter(self.networks.values())).backend if self.networks else "torch"

    def torch_module(self, key: str = "model") -> Any:
        """The PyTorch module behind network ``key`` (to save, inspect or export it); PyTorch backend only."""
        module = getattr(self.networks[key], "module", None)
        if module is None:
            raise ValueError(f"{self.name} runs from an ONNX export in {self.weights_path}, which holds no PyTorch "
                             "network; load it with backend: torch.")
        return module

    def _unsupported(self, task: str) -> UnsupportedTask:
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
        if self.export is not None:
            out["onnx"] = {"folder": str(self.weights_path), "opset": self.export.get("opset"),
                           "exporter": self.export.get("exporter"), "parity": self.export.get("parity"),
                           "providers": {key: network.describe().get("providers")
                                         for key, network in self.networks.items()}}
        return out


def reject_options(spec: ModelSpec, backend: str, options: Mapping[str, Any], accepted: Sequence[str],
                   extra_hint: str = "") -> None:
    """A ``ValueError`` naming the options a runner does not take (a config typo must not pass silently)."""
    if options:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes none"
        where = " (ONNX)" if backend == "onnx" else ""
        raise ValueError(f"Model {spec.name!r}{where} does not take option(s) {', '.join(sorted(options))}; "
                         f"{takes}{extra_hint}.")

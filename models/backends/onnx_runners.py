"""ONNX Runtime runners: each subclasses its family's PyTorch runner and replaces only the forward pass.

Preprocessing (``vfm.models.images``), softmax/top-k, pooling, detection post-processing and the
MTCNN cascade are the PyTorch runners' own code, inherited; the graph computes exactly what
the PyTorch runner's network call computed. So a difference between backends can only come
from the graph, and the export's parity check has already bounded that.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..export_detect import image_tensor
from ..families.classification import TorchClassifier, _checked_images
from ..families.detection_base import DetectArgs, DetectionRunner, RawDetections
from ..families.detection_mtcnn import DEFAULT_STAGE_THRESHOLDS, MTCNNFaceDetector
from ..families.vit import POOLINGS, HFViTRunner
from ..images import preprocess_batch
from ..registry import ModelSpec
from ..runner import Runner
from .onnx import SESSION_OPTIONS, LoadedExport, OnnxRunnerMixin, OnnxSession
from .onnx_sam import OnnxSam

log = logging.getLogger(__name__)


def reject_options(spec: ModelSpec, options: dict[str, Any], accepted: Sequence[str]) -> None:
    if options:
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes none"
        raise ValueError(f"Model {spec.name!r} (ONNX) does not take option(s) {', '.join(sorted(options))}; {takes} "
                         f"besides the session settings ({', '.join(SESSION_OPTIONS)}).")


class OnnxClassifier(OnnxRunnerMixin, TorchClassifier):
    """``classify`` and ``embed`` of ``TorchClassifier`` over a ``features``/``logits`` graph."""

    def __init__(self, spec: ModelSpec, loaded: LoadedExport, device: str, **options: Any):
        reject_options(spec, options, ())
        Runner.__init__(self, spec, device=device, weights_path=loaded.folder)
        self.export = loaded
        self.session: OnnxSession = loaded.sessions["model"]
        self.head_path = loaded.runtime.get("head_path", "")
        self.feature_dim = int(loaded.runtime["feature_dim"])
        self.dtype = None
        self._labels = tuple(loaded.config["labels"])

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    def state_dict(self) -> dict[str, Any]:
        raise ValueError(f"{self.name} runs from an ONNX export in {self.export.folder}, which holds no state "
                         "dict; load it with backend: torch for its weights.")

    def features_and_logits(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        images = _checked_images(images)
        if not images:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, len(self.labels)), np.float32)
        out = self.session.run({"input": preprocess_batch(images, self.spec.preprocess)}, ["features", "logits"])
        return out["features"], out["logits"]


class OnnxViT(OnnxRunnerMixin, HFViTRunner):
    """``embed`` (pooled tokens) and ``classify`` of ``HFViTRunner`` over a ``tokens``/``logits`` graph."""

    def __init__(self, spec: ModelSpec, loaded: LoadedExport, device: str, pooling: str = "cls",
                 batch_size: int = 32, attn_implementation: str | None = None, **options: Any):
        # attn_implementation is chosen at export time; accepted so one config serves both backends
        reject_options(spec, options, ("pooling", "batch_size"))
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        Runner.__init__(self, spec, device=device, weights_path=loaded.folder)
        self.export = loaded
        self.session: OnnxSession = loaded.sessions["model"]
        self.model = None
        self.dtype = torch.float32
        self.pooling = pooling
        self.batch_size = batch_size
        self.hidden_size = int(loaded.runtime["hidden_size"])
        labels = loaded.config.get("labels")
        self.labels = tuple(labels) if labels else None
        self._has_classifier = bool(loaded.runtime["has_classifier"])

    @property
    def has_classifier(self) -> bool:
        return self._has_classifier

    def _forward(self, images: Sequence[np.ndarray]) -> tuple[Any, Any]:
        names = ["tokens", "logits"] if self.has_classifier else ["tokens"]
        out = self.session.run({"input": preprocess_batch(images, self.spec.preprocess)}, names)
        logits = torch.from_numpy(out["logits"]) if self.has_classifier else None
        return torch.from_numpy(out["tokens"]), logits


class OnnxDetector(OnnxRunnerMixin, DetectionRunner):
    """A torchvision detector's graph, one session call per image; thresholds, NMS and the cap are
    ``DetectionRunner``'s, as on torch (see ``vfm.models.export_detect``)."""

    def __init__(self, spec: ModelSpec, loaded: LoadedExport, device: str, **options: Any):
        reject_options(spec, options, ())
        DetectionRunner.__init__(self, spec, device=device, weights_path=loaded.folder)
        self.export = loaded
        self.session: OnnxSession = loaded.sessions["model"]
        self.input_name = loaded.runtime.get("input", "image")
        self.min_score = float(loaded.runtime["min_score"])
        self._labels = tuple(loaded.config["labels"])

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    def _group_key(self, image: np.ndarray) -> str:
        return "one-by-one"  # every image is its own session call, so grouping changes nothing

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        if args.score_threshold < self.min_score:
            raise ValueError(f"score_threshold {args.score_threshold} is below {self.min_score}, the lowest score "
                             f"this ONNX export of {self.name} keeps; use a higher one or re-export with "
                             f"`vfm export {self.name} --min-score {args.score_threshold}`.")
        out = []
        for image in images:
            res = self.session.run({self.input_name: image_tensor(image)}, ["boxes", "scores", "labels"])
            out.append(RawDetections(res["boxes"], res["scores"], res["labels"]))
        return out


class OrtNet:
    """Stands in for one MTCNN network inside facenet's ``detect_face``: tensor in, tuple of tensors out."""

    def __init__(self, session: OnnxSession, outputs: Sequence[str]):
        self.session = session
        self.outputs = list(outputs)

    def parameters(self):
        # detect_face reads the model dtype from the first parameter; the graphs are float32
        yield torch.empty(0, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.session.run({"input": x.detach().float().cpu().numpy()}, self.outputs)
        return tuple(torch.from_numpy(out[name]).to(x.device) for name in self.outputs)


class OnnxMTCNN(OnnxRunnerMixin, MTCNNFaceDetector):
    """facenet's ``detect_face`` cascade, as on torch, with PNet/RNet/ONet running in ONNX Runtime."""

    def __init__(self, spec: ModelSpec, loaded: LoadedExport, device: str, min_face_size: int = 20,
                 stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS, **options: Any):
        reject_options(spec, options, ("min_face_size", "stage_thresholds"))
        if isinstance(min_face_size, bool) or not isinstance(min_face_size, int) or min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 pixels (PNet's window), got {min_face_size!r}.")
        stage_thresholds = tuple(stage_thresholds)
        if len(stage_thresholds) != 2 or not all(0.0 <= float(t) <= 1.0 for t in stage_thresholds):
            raise ValueError(f"stage_thresholds must be two numbers in [0, 1] (PNet, RNet), got {stage_thresholds!r}.")
        # The cascade between the nets is torch code; without a CUDA build of torch it runs on the CPU.
        torch_device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        DetectionRunner.__init__(self, spec, device=torch_device, weights_path=loaded.folder)
        self.export = loaded
        outputs = loaded.runtime["outputs"]
        self.nets = {key: OrtNet(loaded.sessions[key], outputs[key]) for key in ("pnet", "rnet", "onet")}
        self.min_face_size = int(min_face_size)
        self.stage_thresholds = tuple(float(t) for t in stage_thresholds)


RUNNERS: dict[str, type] = {"classifier": OnnxClassifier, "vit": OnnxViT, "torchvision_detector": OnnxDetector,
                            "mtcnn": OnnxMTCNN, "sam": OnnxSam}


def build_onnx_runner(spec: ModelSpec, loaded: LoadedExport, device: str, options: dict[str, Any]) -> Runner:
    kind = loaded.config.get("kind")
    if kind not in RUNNERS:
        raise ValueError(f"{loaded.folder}/config.json names runner kind {kind!r}, which this vfm does not know; "
                         f"re-export with `vfm export {spec.name}`.")
    return RUNNERS[kind](spec, loaded, device, **options)

"""``mtcnn_faces``: facenet-pytorch's MTCNN face detector with the weights its wheel ships.

facenet's ``MTCNN`` class would ``torch.load`` its three files itself (full unpickling), so
we build ``PNet``/``RNet``/``ONet`` with ``pretrained=False``, load their state dicts with the
safe ``vfm.models.weights.load_state_dict``, and run facenet's own cascade (``detect_face``).

Thresholds: MTCNN filters at each of its three stages (facenet defaults 0.6, 0.7, 0.7). The
first two only prune proposals and their scores are never reported; the score a detection
carries is ONet's, the last stage. So ``score_threshold`` becomes the ONet threshold and the
proposal stages keep facenet's defaults (``stage_thresholds`` option). ``iou_threshold`` is
applied as IoU NMS after MTCNN's own final "Min" NMS at 0.7.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..backends.torch import torch_dtype
from ..registry import ModelSpec, register_model
from ..checkpoints import load_state_dict
from ..weights import PackageWeights, WeightsUnavailable
from .detection_base import DetectArgs, DetectionRunner, RawDetections
from .detection_torchvision import seeded

log = logging.getLogger(__name__)

FACE_LABELS = ("face",)
NETS = ("pnet", "rnet", "onet")
DEFAULT_STAGE_THRESHOLDS = (0.6, 0.7)   # PNet, RNet: facenet's defaults
PYRAMID_FACTOR = 0.709                  # facenet's default scale step


def facenet_data_dir() -> Path:
    """The ``data`` folder of the installed facenet-pytorch (holds pnet.pt, rnet.pt, onet.pt)."""
    spec = importlib.util.find_spec("facenet_pytorch")  # finds it without importing it
    if spec is None or not spec.origin:
        raise ImportError("facenet_pytorch is not installed")
    return Path(spec.origin).parent / "data"


MTCNN_WEIGHTS = PackageWeights(package="facenet-pytorch", locate=facenet_data_dir,
                               install_hint="pip install --no-deps facenet-pytorch==2.6.0")


def _weights_file(folder: Path, net: str) -> Path:
    for name in (f"{net}.safetensors", f"{net}.pt"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsUnavailable(f"Weights for model 'mtcnn_faces': {folder} has no {net}.pt or {net}.safetensors; "
                             "the folder must hold pnet, rnet and onet state dicts.")


class MTCNNFaceDetector(DetectionRunner):
    """Faces with five landmarks (eyes, nose, mouth corners) in ``Detection.extra["landmarks"]``."""

    def __init__(self, spec: ModelSpec, nets: dict[str, torch.nn.Module], device: str, weights_path: Path | None,
                 dtype: torch.dtype = torch.float32, min_face_size: int = 20,
                 stage_thresholds: tuple[float, float] = DEFAULT_STAGE_THRESHOLDS):
        super().__init__(spec, device=device, weights_path=weights_path)
        self.nets = {k: v.to(device=device, dtype=dtype).eval() for k, v in nets.items()}
        self.min_face_size = int(min_face_size)
        self.stage_thresholds = tuple(float(t) for t in stage_thresholds)

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        height, width = images[0].shape[:2]
        if min(height, width) < max(self.min_face_size, 12):
            # Smaller than the smallest face (and than PNet's 12-pixel window): facenet would
            # build an empty pyramid and fail on it.
            return [RawDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), []) for _ in images]
        thresholds = [*self.stage_thresholds, args.score_threshold]
        with torch.inference_mode():
            batch_boxes, batch_points = detect_face(np.stack(images), self.min_face_size, self.nets["pnet"],
                                                    self.nets["rnet"], self.nets["onet"], thresholds,
                                                    PYRAMID_FACTOR, self.device)
        out = []
        for boxes, points in zip(batch_boxes, batch_points, strict=True):
            boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
            points = np.asarray(points, np.float32).reshape(-1, 5, 2)
            extra = [{"landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in p]} for p in points]
            out.append(RawDetections(boxes[:, :4], boxes[:, 4], np.zeros(len(boxes), np.int64), extra))
        return out


def _build_nets() -> dict[str, torch.nn.Module]:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    return {"pnet": PNet(pretrained=False), "rnet": RNet(pretrained=False), "onet": ONet(pretrained=False)}


@register_model("mtcnn_faces", task="detect", family="detection", weights=MTCNN_WEIGHTS, labels=FACE_LABELS,
                description="MTCNN face detector with 5 landmarks (facenet-pytorch weights, offline).")
def mtcnn_faces(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
                min_face_size: int = 20,
                stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS) -> MTCNNFaceDetector:
    """``weights_path``: a folder with pnet/rnet/onet state dicts (None: seeded random nets)."""
    tdtype = torch_dtype(dtype, device)
    if isinstance(min_face_size, bool) or not isinstance(min_face_size, int) or min_face_size < 12:
        raise ValueError(f"min_face_size must be >= 12 pixels (PNet's window), got {min_face_size!r}.")
    stage_thresholds = tuple(stage_thresholds)
    if len(stage_thresholds) != 2 or not all(0.0 <= float(t) <= 1.0 for t in stage_thresholds):
        raise ValueError(f"stage_thresholds must be two numbers in [0, 1] (PNet, RNet), got {stage_thresholds!r}.")
    nets = seeded(_build_nets)
    if weights_path is not None:
        folder = Path(weights_path)
        for name, net in nets.items():
            net.load_state_dict(load_state_dict(_weights_file(folder, name)))
    else:
        log.info("mtcnn_faces: seeded random weights")
    return MTCNNFaceDetector(spec, nets, device, weights_path, dtype=tdtype, min_face_size=min_face_size,
                             stage_thresholds=stage_thresholds)

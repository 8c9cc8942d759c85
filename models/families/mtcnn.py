"""``mtcnn_faces``: facenet-pytorch's MTCNN face detector with the weights its wheel ships.

facenet's ``MTCNN`` class would ``torch.load`` its three files itself (full unpickling), so
we build ``PNet``/``RNet``/``ONet`` with ``pretrained=False``, load their state dicts with the
safe ``vfm.models.checkpoints.load_into``, and run facenet's own cascade (``detect_face``).
The three networks are PyTorch modules or the graphs of an ONNX export; the cascade calls
them through ``CascadeNet``, the same way on both backends.

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
from typing import Any, Mapping

import numpy as np

from ..checkpoints import load_into, seeded
from ..network import Network
from ..runner import reject_options
from ..spec import ModelSpec, register_model
from ..weights import PackageWeights, WeightsUnavailable
from .detection import DetectArgs, DetectionRunner, RawDetections

log = logging.getLogger(__name__)

ONNX_KIND = "mtcnn"                     # config.json "kind" of an export of this family
FACE_LABELS = ("face",)
DEFAULT_STAGE_THRESHOLDS = (0.6, 0.7)   # PNet, RNet: facenet's defaults
PYRAMID_FACTOR = 0.709                  # facenet's default scale step
# Each network's outputs, in the order it returns them; its input is "input"
NET_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pnet": ("regression", "probability"),
    "rnet": ("regression", "probability"),
    "onet": ("regression", "landmarks", "probability"),
}


def facenet_data_dir() -> Path:
    """The ``data`` folder of the installed facenet-pytorch (holds pnet.pt, rnet.pt, onet.pt)."""
    spec = importlib.util.find_spec("facenet_pytorch")  # finds it without importing it
    if spec is None or not spec.origin:
        raise ImportError("facenet_pytorch is not installed")
    return Path(spec.origin).parent / "data"


MTCNN_WEIGHTS = PackageWeights(package="facenet-pytorch", locate=facenet_data_dir,
                               install_hint="pip install --no-deps facenet-pytorch==2.6.0")


class CascadeNet:
    """One network as facenet's ``detect_face`` calls it: a tensor in, a tuple of tensors out."""

    def __init__(self, network: Network, outputs: Sequence[str]):
        self.network = network
        self.outputs = list(outputs)

    def parameters(self) -> Any:
        # detect_face reads the input dtype from the first parameter; the network call takes float32
        import torch

        yield torch.empty(0, dtype=torch.float32)

    def __call__(self, x: Any) -> tuple[Any, ...]:
        import torch

        out = self.network.run({"input": x.detach().float().cpu().numpy()}, self.outputs)
        return tuple(torch.from_numpy(out[name]).to(x.device) for name in self.outputs)


class MTCNNFaceDetector(DetectionRunner):
    """Faces with five landmarks (eyes, nose, mouth corners) in ``Detection.extra["landmarks"]``."""

    def __init__(self, spec: ModelSpec, networks: Mapping[str, Network], device: str, *,
                 min_face_size: int = 20, stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS,
                 weights_path: Path | None = None, export: dict[str, Any] | None = None):
        if isinstance(min_face_size, bool) or not isinstance(min_face_size, int) or min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 pixels (PNet's window), got {min_face_size!r}.")
        stage_thresholds = tuple(stage_thresholds)
        if len(stage_thresholds) != 2 or not all(0.0 <= float(t) <= 1.0 for t in stage_thresholds):
            raise ValueError(f"stage_thresholds must be two numbers in [0, 1] (PNet, RNet), got {stage_thresholds!r}.")
        super().__init__(spec, networks, device=device, weights_path=weights_path, export=export)
        self.cascade = {key: CascadeNet(networks[key], outputs) for key, outputs in NET_OUTPUTS.items()}
        self.min_face_size = int(min_face_size)
        self.stage_thresholds = tuple(float(t) for t in stage_thresholds)

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        import torch
        from facenet_pytorch.models.utils.detect_face import detect_face

        height, width = images[0].shape[:2]
        if min(height, width) < max(self.min_face_size, 12):
            # Smaller than the smallest face (and than PNet's 12-pixel window): facenet would
            # build an empty pyramid and fail on it.
            return [RawDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), []) for _ in images]
        thresholds = [*self.stage_thresholds, args.score_threshold]
        # The cascade between the networks is torch code; without a CUDA build of torch it runs on the CPU.
        cascade_device = self.device if self.device == "cpu" or torch.cuda.is_available() else "cpu"
        with torch.inference_mode():
            batch_boxes, batch_points = detect_face(np.stack(images), self.min_face_size, self.cascade["pnet"],
                                                    self.cascade["rnet"], self.cascade["onet"], thresholds,
                                                    PYRAMID_FACTOR, cascade_device)
        out = []
        for boxes, points in zip(batch_boxes, batch_points, strict=True):
            boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
            points = np.asarray(points, np.float32).reshape(-1, 5, 2)
            extra = [{"landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in p]} for p in points]
            out.append(RawDetections(boxes[:, :4], boxes[:, 4], np.zeros(len(boxes), np.int64), extra))
        return out


def _weights_file(folder: Path, net: str) -> Path:
    for name in (f"{net}.safetensors", f"{net}.pt"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsUnavailable(f"Weights for model 'mtcnn_faces': {folder} has no {net}.pt or {net}.safetensors; "
                             "the folder must hold pnet, rnet and onet state dicts.")


def _build_nets() -> dict[str, Any]:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    return {"pnet": PNet(pretrained=False), "rnet": RNet(pretrained=False), "onet": ONet(pretrained=False)}


@register_model("mtcnn_faces", task="detect", family="detection", weights=MTCNN_WEIGHTS, labels=FACE_LABELS,
                description="MTCNN face detector with 5 landmarks (facenet-pytorch weights, offline).")
def mtcnn_faces(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
                min_face_size: int = 20,
                stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS) -> MTCNNFaceDetector:
    """``weights_path``: a folder with pnet/rnet/onet state dicts (None: seeded random nets)."""
    from ..backends.torch import TorchNetwork, torch_dtype

    tdtype = torch_dtype(dtype, device)
    nets = seeded(_build_nets)
    if weights_path is not None:
        folder = Path(weights_path)
        for name, net in nets.items():
            load_into(net, _weights_file(folder, name), spec.name)
    else:
        log.info("mtcnn_faces: seeded random weights")
    networks = {key: TorchNetwork(net, ["input"], NET_OUTPUTS[key], device=device, dtype=tdtype)
                for key, net in nets.items()}
    return MTCNNFaceDetector(spec, networks, device, min_face_size=min_face_size, stage_thresholds=stage_thresholds,
                             weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                min_face_size: int = 20, stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS,
                **options: Any) -> MTCNNFaceDetector:
    """The ONNX runner: the same cascade over the export's pnet/rnet/onet graphs."""
    reject_options(spec, "onnx", options, ("min_face_size", "stage_thresholds"))
    return MTCNNFaceDetector(spec, networks, device, min_face_size=min_face_size, stage_thresholds=stage_thresholds,
                             weights_path=folder, export=config)

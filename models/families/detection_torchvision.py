"""torchvision's COCO detectors: Faster R-CNN v2, RetinaNet v2 and SSDlite.

The network comes from torchvision's builder with ``weights=None, weights_backbone=None`` so
that torchvision never downloads or unpickles anything itself; the COCO state dict is
resolved by ``vfm.models.weights`` (cache, then a sha256-checked download) and loaded with the
safe ``load_state_dict``. ``weights="random"`` gives a seeded random init of the full model.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.hub import HASH_REGEX
from torchvision.models import detection as tvd

from ..backends.torch import torch_dtype
from ..registry import ModelSpec, register_model
from ..checkpoints import load_state_dict
from ..weights import UrlWeights, WeightsUnavailable
from .detection_base import DetectArgs, DetectionRunner, RawDetections

log = logging.getLogger(__name__)

RANDOM_SEED = 0


def torchvision_source(weights_enum: Any) -> UrlWeights:
    """The enum's URL, with the sha256 prefix that torchvision's own ``check_hash`` reads from the name."""
    name = Path(urlsplit(weights_enum.url).path).name
    match = HASH_REGEX.search(name)
    return UrlWeights(url=weights_enum.url, sha256=match.group(1) if match else None)


def seeded(build: Callable[[], torch.nn.Module], seed: int = RANDOM_SEED) -> torch.nn.Module:
    """Build under a fixed seed without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_weights_into(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Load a state dict file into ``model``; a file for another architecture is a clear error."""
    state = load_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailable(
            f"Weights file {path} does not fit model {model_name!r}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}). "
            "Give the checkpoint of this architecture.")


class TorchvisionDetector(DetectionRunner):
    """Runs a torchvision detection model (Faster R-CNN, RetinaNet, SSD) on RGB uint8 images.

    The three detect options go to the model's own post-processing for each call (its score
    threshold, NMS IoU and detections per image), so nothing it would keep is cut early; the
    shared post-processing then re-applies them, which is a no-op on this output.
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, device: str, weights_path: Path | None,
                 dtype: torch.dtype = torch.float32, fixed_input_size: bool = False):
        super().__init__(spec, device=device, weights_path=weights_path)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.dtype = dtype
        # Models that resize every image to one fixed size (SSD) never pad, so any sizes batch.
        self.fixed_input_size = fixed_input_size

    def _group_key(self, image: np.ndarray):
        return "all" if self.fixed_input_size else image.shape[:2]

    def _set_postprocess(self, args: DetectArgs) -> None:
        # Faster R-CNN keeps these on its RoI heads; RetinaNet and SSD on the model itself.
        holder = getattr(self.model, "roi_heads", self.model)
        holder.score_thresh = args.score_threshold
        holder.nms_thresh = args.iou_threshold
        holder.detections_per_img = args.max_detections

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        self._set_postprocess(args)
        with torch.inference_mode():
            tensors = [torch.from_numpy(im).to(self.device).permute(2, 0, 1).to(self.dtype).div(255.0)
                       for im in images]
            outputs = self.model(tensors)
        return [RawDetections(boxes=o["boxes"].float(), scores=o["scores"].float(), label_indices=o["labels"])
                for o in outputs]


def build_torchvision_detector(spec: ModelSpec, weights_path: Path | None, device: str,
                               builder: Callable[..., torch.nn.Module], dtype: str | None = None,
                               fixed_input_size: bool = False, **kwargs: Any) -> TorchvisionDetector:
    """Build ``builder``'s network without weights, then load ``weights_path`` (None: seeded random)."""
    tdtype = torch_dtype(dtype, device)
    num_classes = len(spec.labels) if spec.labels else None
    model = seeded(lambda: builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs))
    if weights_path is not None:
        load_weights_into(model, Path(weights_path), spec.name)
    else:
        log.info("%s: seeded random weights (seed %d)", spec.name, RANDOM_SEED)
    return TorchvisionDetector(spec, model, device, weights_path, dtype=tdtype, fixed_input_size=fixed_input_size)


_FRCNN = tvd.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1
_RETINA = tvd.RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
_SSDLITE = tvd.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1


@register_model("fasterrcnn_resnet50_fpn_v2", task="detect", family="detection", weights=torchvision_source(_FRCNN),
                labels=tuple(_FRCNN.meta["categories"]),
                description="Faster R-CNN ResNet-50 FPN v2, COCO (torchvision); box mAP 46.7.")
def fasterrcnn_resnet50_fpn_v2(spec: ModelSpec, weights_path: Path | None, device: str,
                               dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, tvd.fasterrcnn_resnet50_fpn_v2, dtype=dtype)


@register_model("retinanet_resnet50_fpn_v2", task="detect", family="detection", weights=torchvision_source(_RETINA),
                labels=tuple(_RETINA.meta["categories"]),
                description="RetinaNet ResNet-50 FPN v2, COCO (torchvision); box mAP 41.5.")
def retinanet_resnet50_fpn_v2(spec: ModelSpec, weights_path: Path | None, device: str,
                              dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, tvd.retinanet_resnet50_fpn_v2, dtype=dtype)


@register_model("ssdlite320_mobilenet_v3_large", task="detect", family="detection",
                weights=torchvision_source(_SSDLITE), labels=tuple(_SSDLITE.meta["categories"]),
                description="SSDlite 320 MobileNetV3-Large, COCO (torchvision); box mAP 21.3, fast on CPU.")
def ssdlite320_mobilenet_v3_large(spec: ModelSpec, weights_path: Path | None, device: str,
                                  dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, tvd.ssdlite320_mobilenet_v3_large, dtype=dtype,
                                      fixed_input_size=True)

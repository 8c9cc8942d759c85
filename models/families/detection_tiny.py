"""``tiny_detector``: a seeded random Faster R-CNN small enough for tests and smoke deploys.

It is the real torchvision ``FasterRCNN`` (RPN, RoIAlign, box head, per-class NMS) over a
four-layer conv backbone, so everything around it (batching, thresholds, coordinates, ONNX
export, the service) is exercised on the same code paths as the COCO models, in tens of
milliseconds on a CPU. Random weights would give near-uniform class scores; the classifier
is initialised so that foreground scores spread widely and a low threshold yields boxes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from ..backends.torch import torch_dtype
from ..registry import ModelSpec, register_model
from .detection_torchvision import TorchvisionDetector, load_weights_into, seeded

TINY_LABELS = ("__background__", "circle", "square", "triangle", "person")
TINY_SEED = 0
FEATURE_CHANNELS = 32
CLASSIFIER_STD = 0.5


def _backbone() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for out in (16, 32, FEATURE_CHANNELS, FEATURE_CHANNELS):  # stride 16 overall
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        channels = out
    backbone = nn.Sequential(*layers)
    backbone.out_channels = FEATURE_CHANNELS  # what FasterRCNN reads
    return backbone


def build_tiny_faster_rcnn(num_classes: int = len(TINY_LABELS)) -> FasterRCNN:
    """The network (unseeded); ``tiny_detector`` seeds it."""
    representation = 64
    model = FasterRCNN(
        _backbone(),
        num_classes=None,
        min_size=160, max_size=320,
        rpn_anchor_generator=AnchorGenerator(sizes=((24, 48, 96),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(FEATURE_CHANNELS * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
    )
    # PyTorch's default init shrinks activations layer by layer, so every proposal would get
    # the same features and the same near-uniform scores. He init keeps them varied, and a
    # wide classifier with a low background bias spreads the foreground scores.
    for module in list(model.backbone.modules()) + list(model.roi_heads.box_head.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        nn.init.normal_(cls.weight, std=CLASSIFIER_STD)
        cls.bias.zero_()
        cls.bias[0] = -2.0
    return model


@register_model("tiny_detector", task="detect", family="detection", labels=TINY_LABELS, weights=None,
                random_weights=True,
                description="Seeded random tiny Faster R-CNN (4 labels) for tests and smoke deploys.")
def tiny_detector(spec: ModelSpec, weights_path: Path | None, device: str,
                  dtype: str | None = None) -> TorchvisionDetector:
    tdtype = torch_dtype(dtype, device)
    model = seeded(lambda: build_tiny_faster_rcnn(len(spec.labels)), seed=TINY_SEED)
    if weights_path is not None:  # e.g. a state dict saved from this network
        load_weights_into(model, Path(weights_path), spec.name)
    return TorchvisionDetector(spec, model, device, weights_path, dtype=tdtype)

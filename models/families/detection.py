"""Object detection: torchvision's COCO detectors and the seeded ``tiny_detector``, on either backend.

Read top to bottom:

1. What every detector shares (``DetectionRunner``, also MTCNN's base in ``mtcnn.py``):
   argument checks, grouping images so batching never changes a result, and one
   post-processing for every model: boxes clipped to the image, scores at or above
   ``score_threshold``, class-aware NMS at ``iou_threshold``, at most ``max_detections``,
   highest score first. Doing this in one place is what lets the HTTP layer promise the same
   meaning of the three options for every detector.
2. ``TorchvisionDetector``: the runner of a torchvision detection network. Its network call is
   ``images`` (a list of [3, H, W] float images in [0, 1]) + the three options -> ``boxes``,
   ``scores``, ``labels`` of every image, concatenated, and ``counts`` per image. On PyTorch
   the options go to the model's own post-processing; an ONNX export (one image per graph
   call, traced with the loosest settings, see ``vfm.models.export.detect``) is adapted to
   the same call by ``OnnxDetectorCall``, and the shared post-processing applies the options.
3. The builders and the zoo: fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn_v2,
   ssdlite320_mobilenet_v3_large (COCO weights, resolved and loaded by vfm, never by
   torchvision) and tiny_detector (a real ``FasterRCNN`` over a four-layer backbone, tens of
   milliseconds on a CPU, for tests and smoke deploys).

torch and torchvision are imported inside functions: registering these models needs neither.
"""
from __future__ import annotations

import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..checkpoints import RANDOM_SEED, load_into, seeded
from ..images import as_rgb_array
from ..labels import coco_categories
from ..network import Network
from ..results import Detection, Detections
from ..runner import Runner, reject_options
from ..spec import ModelSpec, register_model
from ..weights import UrlWeights

log = logging.getLogger(__name__)

FAMILY = "detection"
ONNX_KIND = "torchvision_detector"   # config.json "kind" of an export of this family
OUTPUTS = ("boxes", "scores", "labels")


# ---- 1. what every detector shares ------------------------------------------------------------

@dataclass
class RawDetections:
    """One image's detector output before the shared post-processing (tensors or arrays)."""

    boxes: Any                      # [N, 4] x0, y0, x1, y1 in original-image pixels
    scores: Any                     # [N]
    label_indices: Any              # [N] int, indices into the runner's labels
    extra: list[dict[str, Any]] | None = None   # per box, e.g. face landmarks
    image_size: tuple[int, int] = (0, 0)        # (height, width)


@dataclass(frozen=True)
class DetectArgs:
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    max_detections: int = 100


def check_detect_args(score_threshold: float, iou_threshold: float, max_detections: int) -> DetectArgs:
    """Validate the three detect options; a bad value is a ``ValueError`` that names it."""
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)):
        raise ValueError(f"max_detections must be an integer >= 1, got {max_detections!r}.")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections!r}.")
    return DetectArgs(float(score_threshold), float(iou_threshold), int(max_detections))


def prepare_image(image: Any, index: int) -> np.ndarray:
    """An HxWx3 uint8 array with at least one pixel; a ``TypeError``/``ValueError`` names the image."""
    try:
        arr = as_rgb_array(image)
    except TypeError as exc:
        raise TypeError(f"image {index}: {exc}") from None
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        arr = arr.copy()
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image {index} is empty ({arr.shape[0]}x{arr.shape[1]} pixels).")
    return arr


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def finalize(raw: RawDetections, labels: Sequence[str], args: DetectArgs) -> Detections:
    """Clip, threshold, class-aware NMS, cap and sort one image's raw detections."""
    import torch
    from torchvision.ops import batched_nms

    height, width = raw.image_size
    boxes = torch.as_tensor(raw.boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    scores = torch.as_tensor(raw.scores, dtype=torch.float32).reshape(-1).cpu()
    label_idx = torch.as_tensor(raw.label_indices, dtype=torch.int64).reshape(-1).cpu()
    # Not in place: the tensors may be inference tensors made under torch.inference_mode.
    upper = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), upper)
    keep = torch.nonzero(scores >= args.score_threshold).flatten()
    # batched_nms sorts by decreasing score, which is the order the result promises.
    kept = batched_nms(boxes[keep], scores[keep], label_idx[keep], args.iou_threshold)
    keep = keep[kept][: args.max_detections]
    out = []
    for i in keep.tolist():
        index = int(label_idx[i])
        label = labels[index] if 0 <= index < len(labels) else str(index)
        extra = dict(raw.extra[i]) if raw.extra is not None else {}
        out.append(Detection(box=tuple(float(v) for v in boxes[i].tolist()), score=float(scores[i]),
                             label=label, index=index, extra=extra))
    return Detections(detections=out, image_size=(int(height), int(width)))


class DetectionRunner(Runner, ABC):
    """Base runner: validates, groups images so batching never changes a result, post-processes.

    Subclasses implement ``_detect_group(images, args) -> list[RawDetections]`` for a list of
    images that share a ``_group_key``.
    """

    def __init__(self, spec: ModelSpec, networks: Mapping[str, Network], device: str = "cpu",
                 weights_path: Path | None = None, export: dict[str, Any] | None = None,
                 labels: Sequence[str] | None = None):
        super().__init__(spec, networks, device=device, weights_path=weights_path, export=export)
        self.labels: tuple[str, ...] = tuple(labels or spec.labels or ())
        # The networks are shared by the threads of one replica; a call runs alone.
        self._lock = threading.Lock()

    def _group_key(self, image: np.ndarray) -> Hashable:
        # Batching pads images to the largest one, which changes features near the border;
        # images of one size are never padded, so a batch gives the one-by-one answer.
        return image.shape[:2]

    @abstractmethod
    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        """Raw detections for images of one group key, in the order given."""

    def detect(self, images: Sequence[np.ndarray], score_threshold: float = 0.5, iou_threshold: float = 0.5,
               max_detections: int = 100) -> list[Detections]:
        """Detections per image, boxes (x0, y0, x1, y1) in original-image pixels, best first."""
        args = check_detect_args(score_threshold, iou_threshold, max_detections)
        arrays = [prepare_image(im, i) for i, im in enumerate(images)]
        results: list[Detections | None] = [None] * len(arrays)
        with self._lock:
            for group in group_indices([self._group_key(a) for a in arrays]):
                raws = self._detect_group([arrays[i] for i in group], args)
                for i, raw in zip(group, raws, strict=True):
                    raw.image_size = arrays[i].shape[:2]
                    results[i] = finalize(raw, self.labels, args)
        return results  # type: ignore[return-value]


# ---- 2. torchvision detectors ------------------------------------------------------------------

def image_tensor(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> [3, H, W] float32 in [0, 1], the input of a torchvision detector."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)


class TorchvisionDetector(DetectionRunner):
    """Runs a torchvision detection network (Faster R-CNN, RetinaNet, SSD) or its ONNX export.

    ``batch_any_sizes``: images of any sizes share one network call, because the network
    resizes every image to one fixed size (SSD) or takes one image per graph call (ONNX).
    """

    def __init__(self, spec: ModelSpec, network: Network, device: str, *, batch_any_sizes: bool = False,
                 labels: Sequence[str] | None = None, weights_path: Path | None = None,
                 export: dict[str, Any] | None = None):
        super().__init__(spec, {"model": network}, device=device, weights_path=weights_path, export=export,
                         labels=labels)
        self.network = network
        self.batch_any_sizes = batch_any_sizes

    @property
    def model(self) -> Any:
        """The torchvision network (PyTorch backend only)."""
        return self.torch_module().model

    def _group_key(self, image: np.ndarray) -> Hashable:
        return "all" if self.batch_any_sizes else image.shape[:2]

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        out = self.network.run({"images": [image_tensor(im) for im in images],
                                "score_threshold": np.float64(args.score_threshold),
                                "iou_threshold": np.float64(args.iou_threshold),
                                "max_detections": np.int64(args.max_detections)})
        raws, start = [], 0
        for count in out["counts"].tolist():
            end = start + int(count)
            raws.append(RawDetections(out["boxes"][start:end], out["scores"][start:end], out["labels"][start:end]))
            start = end
        return raws


def set_postprocess(model: Any, args: DetectArgs) -> None:
    """Give a torchvision detector the three options for its own post-processing."""
    # Faster R-CNN keeps these on its RoI heads; RetinaNet and SSD on the model itself.
    holder = getattr(model, "roi_heads", model)
    holder.score_thresh = args.score_threshold
    holder.nms_thresh = args.iou_threshold
    holder.detections_per_img = args.max_detections


def detector_module(model: Any) -> Any:
    """The PyTorch network call: the three options go to the model's own post-processing for each
    call (so nothing it would keep is cut early; the shared post-processing then re-applies them,
    a no-op on this output), and the per-image dicts become concatenated arrays + counts."""
    import torch
    from torch import nn

    class DetectorCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: list[Any], score_threshold: Any, iou_threshold: Any,
                    max_detections: Any) -> tuple[Any, ...]:
            set_postprocess(self.model, DetectArgs(float(score_threshold), float(iou_threshold),
                                                   int(max_detections)))
            outputs = self.model(images)
            counts = torch.tensor([len(o["scores"]) for o in outputs], dtype=torch.int64)
            return (torch.cat([o["boxes"].float() for o in outputs]).reshape(-1, 4),
                    torch.cat([o["scores"].float() for o in outputs]),
                    torch.cat([o["labels"] for o in outputs]), counts)

    return DetectorCall()


class OnnxDetectorCall:
    """A detector's ONNX graph (one image per call, scores above ``min_score``, NMS off) behind the
    network call ``TorchvisionDetector`` makes; the shared post-processing applies the options."""

    backend = "onnx"
    output_names = [*OUTPUTS, "counts"]

    def __init__(self, session: Network, model_name: str, min_score: float, input_name: str = "image"):
        self.session = session
        self.model_name = model_name
        self.min_score = min_score
        self.input_name = input_name

    def run(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        threshold = float(inputs["score_threshold"])
        if threshold < self.min_score:
            raise ValueError(f"score_threshold {threshold} is below {self.min_score}, the lowest score "
                             f"this ONNX export of {self.model_name} keeps; use a higher one or re-export with "
                             f"`vfm export {self.model_name} --min-score {threshold}`.")
        per_image = [self.session.run({self.input_name: image}, list(OUTPUTS)) for image in inputs["images"]]
        return {"boxes": np.concatenate([r["boxes"].reshape(-1, 4) for r in per_image] or [np.zeros((0, 4))]),
                "scores": np.concatenate([r["scores"] for r in per_image] or [np.zeros(0)]),
                "labels": np.concatenate([r["labels"] for r in per_image] or [np.zeros(0, np.int64)]),
                "counts": np.array([len(r["scores"]) for r in per_image], np.int64)}

    def describe(self) -> dict[str, Any]:
        return self.session.describe()


def build_torchvision_detector(spec: ModelSpec, weights_path: Path | None, device: str,
                               builder: Callable[..., Any] | str, dtype: str | None = None,
                               fixed_input_size: bool = False, **kwargs: Any) -> TorchvisionDetector:
    """``builder``'s network (a torchvision function or its name) without weights, then ``weights_path``
    (None: seeded random weights). torchvision never downloads or unpickles anything itself."""
    from ..backends.torch import torch_dtype

    tdtype = torch_dtype(dtype, device)
    if isinstance(builder, str):
        from torchvision.models import detection as tvd

        builder = getattr(tvd, builder)
    num_classes = len(spec.labels) if spec.labels else None
    model = seeded(lambda: builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs))
    return _detector_runner(spec, model, weights_path, device, tdtype, fixed_input_size)


def _detector_runner(spec: ModelSpec, model: Any, weights_path: Path | None, device: str, tdtype: Any,
            fixed_input_size: bool) -> TorchvisionDetector:
    from ..backends.torch import TorchNetwork

    if weights_path is not None:
        load_into(model, weights_path, spec.name)
    else:
        log.info("%s: seeded random weights (seed %d)", spec.name, RANDOM_SEED)
    network = TorchNetwork(detector_module(model), ["images", "score_threshold", "iou_threshold", "max_detections"],
                           [*OUTPUTS, "counts"], device=device, dtype=tdtype,
                           uncast_inputs=("score_threshold", "iou_threshold"))
    return TorchvisionDetector(spec, network, device, batch_any_sizes=fixed_input_size, weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                **options: Any) -> TorchvisionDetector:
    """The ONNX runner: the same ``TorchvisionDetector``, every image its own graph call."""
    reject_options(spec, "onnx", options, ())
    runtime = config.get("runtime") or {}
    call = OnnxDetectorCall(networks["model"], spec.name, float(runtime["min_score"]), runtime.get("input", "image"))
    return TorchvisionDetector(spec, call, device, batch_any_sizes=True, labels=config["labels"], weights_path=folder,
                               export=config)


# ---- 3. the zoo --------------------------------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX: the hex run after the last "-"


def torchvision_source(url: str) -> UrlWeights:
    """A torchvision checkpoint URL with the sha256 prefix that torchvision's own ``check_hash`` reads from the name."""
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    return UrlWeights(url=url, sha256=match.group(1) if match else None)


_TV = "https://download.pytorch.org/models/"


@register_model("fasterrcnn_resnet50_fpn_v2", task="detect", family=FAMILY,
                weights=torchvision_source(_TV + "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"),
                labels=coco_categories(),
                description="Faster R-CNN ResNet-50 FPN v2, COCO (torchvision); box mAP 46.7.")
def fasterrcnn_resnet50_fpn_v2(spec: ModelSpec, weights_path: Path | None, device: str,
                               dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, "fasterrcnn_resnet50_fpn_v2", dtype=dtype)


@register_model("retinanet_resnet50_fpn_v2", task="detect", family=FAMILY,
                weights=torchvision_source(_TV + "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"),
                labels=coco_categories(),
                description="RetinaNet ResNet-50 FPN v2, COCO (torchvision); box mAP 41.5.")
def retinanet_resnet50_fpn_v2(spec: ModelSpec, weights_path: Path | None, device: str,
                              dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, "retinanet_resnet50_fpn_v2", dtype=dtype)


@register_model("ssdlite320_mobilenet_v3_large", task="detect", family=FAMILY,
                weights=torchvision_source(_TV + "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"),
                labels=coco_categories(),
                description="SSDlite 320 MobileNetV3-Large, COCO (torchvision); box mAP 21.3, fast on CPU.")
def ssdlite320_mobilenet_v3_large(spec: ModelSpec, weights_path: Path | None, device: str,
                                  dtype: str | None = None) -> TorchvisionDetector:
    return build_torchvision_detector(spec, weights_path, device, "ssdlite320_mobilenet_v3_large", dtype=dtype,
                                      fixed_input_size=True)


# ---- tiny_detector: the seeded test variant ----------------------------------------------------

TINY_LABELS = ("__background__", "circle", "square", "triangle", "person")
TINY_SEED = 0
TINY_FEATURE_CHANNELS = 32
TINY_CLASSIFIER_STD = 0.5


def build_tiny_faster_rcnn(num_classes: int = len(TINY_LABELS)) -> Any:
    """The network (unseeded; ``tiny_detector`` seeds it): torchvision's ``FasterRCNN`` (RPN,
    RoIAlign, box head, per-class NMS) over a four-layer conv backbone of stride 16."""
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    layers: list[nn.Module] = []
    channels = 3
    for out in (16, 32, TINY_FEATURE_CHANNELS, TINY_FEATURE_CHANNELS):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        channels = out
    backbone = nn.Sequential(*layers)
    backbone.out_channels = TINY_FEATURE_CHANNELS  # what FasterRCNN reads
    representation = 64
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=160, max_size=320,
        rpn_anchor_generator=AnchorGenerator(sizes=((24, 48, 96),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(TINY_FEATURE_CHANNELS * 7 * 7, representation),
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
        nn.init.normal_(cls.weight, std=TINY_CLASSIFIER_STD)
        cls.bias.zero_()
        cls.bias[0] = -2.0
    return model


@register_model("tiny_detector", task="detect", family=FAMILY, labels=TINY_LABELS, weights=None,
                random_weights=True,
                description="Seeded random tiny Faster R-CNN (4 labels) for tests and smoke deploys.")
def tiny_detector(spec: ModelSpec, weights_path: Path | None, device: str,
                  dtype: str | None = None) -> TorchvisionDetector:
    from ..backends.torch import torch_dtype

    tdtype = torch_dtype(dtype, device)
    model = seeded(lambda: build_tiny_faster_rcnn(len(spec.labels)), seed=TINY_SEED)
    return _detector_runner(spec, model, weights_path, device, tdtype, fixed_input_size=False)

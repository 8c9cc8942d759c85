"""What a model is before it is loaded: ``ModelSpec``, and ``@register_model`` that records one.

A model exists because one decorated builder says so (the timm way). Builders live in
``models/families/*``, which import this module to register; looking a model up
(``vfm.models.registry``) imports the families first, so the table is full. This module
imports nothing of the zoo, so that families can use it without an import circle.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

Task = Literal["classify", "detect", "segment", "embed"]
ResizeMode = Literal["resize_center_crop", "resize", "longest_side", "none"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModel(KeyError):
    """A name that is not registered; the message lists the closest names."""

    def __init__(self, name: str, candidates: Sequence[str]):
        close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        self.name = name
        self.close = close
        super().__init__(f"Unknown model {name!r}.{hint} (`vfm models list` shows every model.)")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes the network's input tensor."""

    size: int | tuple[int, int] = 224          # square side, or (height, width)
    resize_mode: ResizeMode = "resize_center_crop"
    crop_pct: float = 0.875                    # resize_center_crop: resize to size/crop_pct, crop size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    def to_json(self) -> dict[str, Any]:
        size = self.size if isinstance(self.size, int) else list(self.size)
        return {"size": size, "resize_mode": self.resize_mode, "crop_pct": self.crop_pct,
                "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


@dataclass(frozen=True)
class ModelSpec:
    """What the zoo knows about a model before loading it.

    ``builder(spec, weights_path, device) -> Runner`` builds the runner; ``weights`` is the
    default source (see ``vfm.models.weights``), ``None`` for random-init test variants.

    ``onnx_graphs`` (graph role -> file name in the weights folder) marks a model whose weights
    *are* ONNX graphs, with no PyTorch network: it runs on the ONNX backend only, and its
    builder is called as ``builder(spec, networks, weights_path, device)`` with one ONNX Runtime
    session per graph (``vfm.models.loading`` opens them).
    """

    name: str
    task: Task
    family: str
    builder: Callable[..., Any]
    weights: Any = None
    preprocess: Preprocess | None = None
    labels: tuple[str, ...] | None = None
    feature_dim: int | None = None      # set when the model can be a fine-tuning backbone
    random_weights: bool = False        # tiny_* and random-init structure variants
    tasks: tuple[Task, ...] = ()        # every task method the runner has; defaults to (task,)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    onnx_graphs: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            object.__setattr__(self, "tasks", (self.task,))

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends it runs on, the default first (``torch`` models also run from an ONNX export)."""
        return ("onnx",) if self.onnx_graphs else ("torch", "onnx")

    @property
    def is_backbone(self) -> bool:
        return self.feature_dim is not None

    def to_json(self) -> dict[str, Any]:
        from .weights import describe_source

        return {
            "name": self.name,
            "task": self.task,
            "tasks": list(self.tasks),
            "family": self.family,
            "backends": list(self.backends),
            "weights": describe_source(self.weights),
            "random_weights": self.random_weights,
            "preprocess": self.preprocess.to_json() if self.preprocess else None,
            "num_labels": len(self.labels) if self.labels else None,
            "feature_dim": self.feature_dim,
            "description": self.description,
        }


# Filled by the families on import; read through ``vfm.models.registry``.
REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; a name registered twice is a bug and raises."""
    if spec.name in REGISTRY:
        raise ValueError(f"Model {spec.name!r} is already registered (by {REGISTRY[spec.name].family}).")
    REGISTRY[spec.name] = spec
    return spec


def register_model(name: str, task: Task, family: str, **kwargs: Any) -> Callable:
    """Decorator: the decorated function is the builder of model ``name``."""

    def wrap(builder: Callable) -> Callable:
        register(ModelSpec(name=name, task=task, family=family, builder=builder, **kwargs))
        return builder

    return wrap


def unregister(name: str) -> None:
    """Remove a model (tests that register temporary specs clean up with this)."""
    REGISTRY.pop(name, None)

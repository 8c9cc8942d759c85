"""The vfm model zoo: load any registered model and run its task methods on RGB images.

    >>> from vfm.models import load_model
    >>> runner = load_model("efficientnet_lite0")
    >>> runner.classify([image], top_k=5)[0].top[0].label
"""
from .checkpoints import UnsafeCheckpoint
from .images import ImageLimits, InvalidImage, decode_image
from .loading import load_model
from .registry import ModelSpec, Preprocess, UnknownModel, get_spec, list_models, register_model
from .results import Classification, Detection, Detections, ImageEmbedding, Label, Masks, Prompt
from .runner import Runner, UnsupportedTask
from .weights import WeightsUnavailable, resolve_weights

__all__ = [
    "Classification", "Detection", "Detections", "ImageEmbedding", "ImageLimits", "InvalidImage", "Label",
    "Masks", "ModelSpec", "Preprocess", "Prompt", "Runner", "UnknownModel", "UnsafeCheckpoint",
    "UnsupportedTask", "WeightsUnavailable", "decode_image", "get_spec", "list_models", "load_model",
    "register_model", "resolve_weights",
]

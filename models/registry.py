"""One place that names every model: look a model up by name, list names by wildcard or task.

The table is filled by ``@register_model`` (``vfm.models.spec``) as each family module is
imported; every lookup here imports the families first. Family modules import torch,
transformers and segment-anything only inside their builders, so listing and describing
models stays fast and needs none of them.
"""
from __future__ import annotations

import fnmatch

from .spec import (IMAGENET_MEAN, IMAGENET_STD, REGISTRY, ModelSpec, Preprocess, ResizeMode, Task, UnknownModel,
                   register, register_model, unregister)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelSpec", "Preprocess", "ResizeMode", "Task", "UnknownModel",
           "get_spec", "list_models", "register", "register_model", "unregister"]


def _ensure_loaded() -> None:
    # Families register themselves on import; published models (fine-tuned, in the models folders) after them.
    from . import families  # noqa: F401
    from .published import discover

    discover()


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    if name not in REGISTRY:
        from .published import discover

        discover(rescan=True)  # published since this process first looked
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(name, REGISTRY) from None


def list_models(pattern: str | None = None, task: Task | None = None) -> list[str]:
    """Sorted names, filtered by a shell-style wildcard (``"sam_*"``) and/or a task."""
    _ensure_loaded()
    names = sorted(REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if task:
        names = [n for n in names if task in REGISTRY[n].tasks]
    return names

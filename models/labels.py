"""Label lists shared by several models: the 1000 ImageNet-1k classes and the 91 COCO categories.

torchvision's weights enums all point at one copy of each list (``meta["categories"]``, from
``torchvision/models/_meta.py``). Reading them from there keeps us from shipping a second copy
that could drift; reading the file's literals (instead of importing it) keeps torch out of
``vfm models list``, which needs the label counts but no network.
"""
from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _torchvision_meta_lists() -> dict[str, ast.expr]:
    """The top-level assignments of torchvision's ``models/_meta.py``, parsed once, not evaluated."""
    found = importlib.util.find_spec("torchvision")  # finds the package without importing it (or torch)
    if found is None or not found.origin:
        raise ImportError("the ImageNet and COCO label lists come from torchvision: pip install torchvision")
    source = Path(found.origin).parent / "models" / "_meta.py"
    return {target.id: node.value for node in ast.parse(source.read_text(encoding="utf-8")).body
            if isinstance(node, ast.Assign) for target in node.targets if isinstance(target, ast.Name)}


@lru_cache(maxsize=None)
def _torchvision_meta(name: str) -> tuple[str, ...]:
    lists = _torchvision_meta_lists()
    if name not in lists:
        raise RuntimeError(f"torchvision's models/_meta.py has no {name}; this torchvision is not one vfm knows.")
    return tuple(ast.literal_eval(lists[name]))


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order ("tench", "goldfish", ...)."""
    names = _torchvision_meta("_IMAGENET_CATEGORIES")
    if len(names) != 1000:  # a torchvision that changed the list would mislabel silently
        raise RuntimeError(f"torchvision's ImageNet list has {len(names)} names, expected 1000.")
    return names


def coco_categories() -> tuple[str, ...]:
    """torchvision's 91 COCO category names in label-index order ("__background__", "person", ..., "N/A" gaps)."""
    names = _torchvision_meta("_COCO_CATEGORIES")
    if len(names) != 91:
        raise RuntimeError(f"torchvision's COCO list has {len(names)} names, expected 91.")
    return names


def numbered_labels(count: int, prefix: str = "class_") -> tuple[str, ...]:
    """``("class_0", ..., "class_{count-1}")`` for models whose classes have no names (test variants)."""
    return tuple(f"{prefix}{i}" for i in range(count))

"""Label lists shared by several models (the 1000 ImageNet-1k classes)."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order ("tench", "goldfish", ...).

    torchvision's weights enums all point at this one list (``meta["categories"]``); reading it
    from there keeps us from shipping a second copy that could drift.
    """
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    if len(_IMAGENET_CATEGORIES) != 1000:  # a torchvision that changed the list would mislabel silently
        raise RuntimeError(f"torchvision's ImageNet list has {len(_IMAGENET_CATEGORIES)} names, expected 1000.")
    return tuple(_IMAGENET_CATEGORIES)


def numbered_labels(count: int, prefix: str = "class_") -> tuple[str, ...]:
    """``("class_0", ..., "class_{count-1}")`` for models whose classes have no names (test variants)."""
    return tuple(f"{prefix}{i}" for i in range(count))

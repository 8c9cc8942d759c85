"""The real-photo answers efficientnet_lite0 must give, on any backend or export (float32, int8): one set of
checks for the e2e tests of the model and of its quantized export."""
from __future__ import annotations

from typing import Any

import skimage.data

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


def check_chelsea_is_a_cat(runner: Any) -> None:
    top = runner.classify([skimage.data.chelsea()], top_k=5)[0].top
    assert top[0].label in CATS, [(t.label, t.score) for t in top]
    # the whole top-3 is cats and together they are confident
    assert all(t.label in CATS for t in top[:3])
    assert sum(t.score for t in top if t.label in CATS) > 0.8


def check_coffee_is_espresso(runner: Any) -> None:
    top = runner.classify([skimage.data.coffee()], top_k=5)[0].top
    assert top[0].label == "espresso", [(t.label, t.score) for t in top]
    assert top[0].score > 0.5

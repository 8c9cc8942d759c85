"""Fixtures shared by unit test modules."""
from __future__ import annotations

import pytest


@pytest.fixture
def forget_published_models():
    """Models a test publishes are registered in this process; unregister them after it (use it per module with
    ``pytestmark = pytest.mark.usefixtures("forget_published_models")``)."""
    from vfm.models import list_models, published
    from vfm.models.registry import unregister

    before = set(list_models())
    yield
    for name in set(list_models()) - before:
        unregister(name)
        published._published.pop(name, None)

"""The SAM image-embedding cache: LRU by image id (the sha256 of the image bytes).

It lives in the replica that runs the encoder, so a hit costs a dict lookup and no copy. Two
requests for the same new image share one encoder run (``claim`` hands the second caller
the first caller's future).
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Any


def image_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """At most ``capacity`` embeddings; the least recently used one goes first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._items

    def get(self, image_id: str) -> Any | None:
        item = self._items.get(image_id)
        if item is not None:
            self._items.move_to_end(image_id)
        return item

    def put(self, image_id: str, embedding: Any) -> None:
        self._items[image_id] = embedding
        self._items.move_to_end(image_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pending(self, image_id: str) -> asyncio.Future | None:
        """The future of an encoder run for ``image_id`` already under way, if any."""
        return self._pending.get(image_id)

    def claim(self, image_id: str) -> asyncio.Future:
        """Mark ``image_id`` as being encoded; ``resolve`` or ``fail`` must follow."""
        future = asyncio.get_running_loop().create_future()
        self._pending[image_id] = future
        return future

    def resolve(self, image_id: str, embedding: Any) -> None:
        self.put(image_id, embedding)
        future = self._pending.pop(image_id, None)
        if future is not None and not future.done():
            future.set_result(embedding)

    def fail(self, image_id: str, outcome: Any) -> None:
        """Wake the waiters of a failed encoder run with ``outcome`` (a ``Failure``), caching nothing."""
        future = self._pending.pop(image_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)

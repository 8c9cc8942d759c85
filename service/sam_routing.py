"""Routing by image id: every request for one SAM image goes to the replica that holds its embedding.

Each SAM replica keeps the embeddings it computed (``sam_cache.py``). With several replicas a prompt by
``image_id`` must reach the one that encoded the image, or it misses. The ingress calls a SAM replica with
``handle.options(multiplexed_model_id=image_id)``, and the SAM deployments route with ``ImageIdRouter``
(Serve's request-router extension, ``RequestRouterConfig``): the replica of an id is

1. the replica this router last sent the id to, while it runs (so an id stays put when replicas are added);
2. else the rendezvous (highest-random-weight) hash of the id over the running replicas: the same answer in
   every router and every process, with nothing to wait for, so the first prompt after an encode finds it.

Serve's own multiplexing does not hold this: a replica's ids reach the routers through the controller (pushed
every 0.1 s, then a long poll), an id not yet known goes to the replica with the fewest ids, and a busy holder
is passed over after 1-2 s; and its FIFO mix-in hands a replica found for one request to the oldest request
waiting. Here a request waits for its holder's capacity (``max_queued_requests`` still bounds the wait: 503
overloaded), never goes elsewhere while the holder runs, and gets the replica chosen for it (no FIFO mix-in).
With several ingress replicas each router remembers only what it sent; they agree by the hash until the set
of SAM replicas changes, after which an id another router placed may be a 404 once (send the image again).

When the holder is gone (its process died, Serve removed it), Serve's router drops it from the running
replicas and the id hashes onto another: a prompt by id alone is a clean 404 ``unknown_image_id`` there (send
the image again), a request with the image encodes it there, and that replica holds it from then on. Requests
without an id (``info``) go to the less loaded of two random replicas, as Serve's default router does.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

ROUTER_PATH = "vfm.service.sam_routing:ImageIdRouter"
# Ids remembered per router (about 100 bytes each): far more than the replicas' caches hold together.
REMEMBERED_IDS = 65536


def _weight(key: str, replica: RunningReplica) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()


def owner(key: str, replicas: Sequence[RunningReplica]) -> RunningReplica:
    """The rendezvous-hash replica of ``key``: removing a replica moves only its own ids, adding one moves 1/n."""
    return max(replicas, key=lambda replica: _weight(key, replica))


class ImageIdRouter(RequestRouter):
    """Sends each request keyed by an image id (``multiplexed_model_id``) to that id's replica; see the module."""

    def initialize_state(self, remembered_ids: int = REMEMBERED_IDS, **kwargs: Any) -> None:
        self._placed: OrderedDict[str, ReplicaID] = OrderedDict()
        self._remembered_ids = remembered_ids

    def holder(self, key: str, candidates: Sequence[RunningReplica]) -> RunningReplica:
        """The replica ``key`` was last sent to while it runs, else its rendezvous-hash replica; remembered."""
        placed = self._placed.get(key)
        chosen = next((r for r in candidates if r.replica_id == placed), None) if placed is not None else None
        if chosen is None:
            chosen = owner(key, candidates)
            self._placed[key] = chosen.replica_id
            while len(self._placed) > self._remembered_ids:
                self._placed.popitem(last=False)
        self._placed.move_to_end(key)
        return chosen

    def _remove_pending_request_from_indices(self, pending_request: PendingRequest) -> None:
        """Ray 2.60 indexes every keyed request in ``_pending_requests_by_model_id`` and cleans that index only in
        ``MultiplexMixin``'s lookup, which a router without the mix-in never calls: every request by image id (its
        arguments, the image included) stayed referenced for the life of the ingress, about one image's bytes per
        SAM request. A request leaves that index here, when it leaves the others."""
        super()._remove_pending_request_from_indices(pending_request)
        index = getattr(self, "_pending_requests_by_model_id", None)
        key = pending_request.metadata.multiplexed_model_id
        queue = index.get(key) if index is not None and key else None
        if queue is not None:
            try:
                queue.remove(pending_request)
            except ValueError:
                pass
            if not queue:
                index.pop(key, None)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between tries (the holder is full, or the set of replicas is changing), do not spin.
            pending_request.routing_context.should_backoff = True
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if key:  # the only candidate: a keyed request waits for its holder, it never goes elsewhere
            return [[self.holder(key, candidate_replicas)]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

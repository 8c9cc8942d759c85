"""Where the SAM router places image ids (service/sam_routing.py): the same replica for an id in every process,
ids spread over the replicas, and a change of replicas moves only the ids it must."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

from vfm.service.sam_routing import owner


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), name=unique_id)


IDS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
ABC = [replica("a1b2c3"), replica("d4e5f6"), replica("g7h8i9")]


def test_ids_spread_over_the_replicas() -> None:
    spread = Counter(owner(i, ABC).name for i in IDS)
    assert set(spread) == {"a1b2c3", "d4e5f6", "g7h8i9"}
    assert min(spread.values()) > len(IDS) / 3 * 0.85, spread


def test_the_order_of_the_replicas_does_not_matter() -> None:
    assert [owner(i, ABC).name for i in IDS[:200]] == [owner(i, ABC[::-1]).name for i in IDS[:200]]


def test_a_removed_replica_moves_only_its_own_ids_and_an_added_one_takes_only_ids_it_wins() -> None:
    before = {i: owner(i, ABC).name for i in IDS}
    without = {i: owner(i, ABC[1:]).name for i in IDS}
    assert all(without[i] == before[i] for i in IDS if before[i] != "a1b2c3")
    grown = {i: owner(i, [*ABC, replica("j0k1l2")]).name for i in IDS}
    moved = [i for i in IDS if grown[i] != before[i]]
    assert all(grown[i] == "j0k1l2" for i in moved)
    assert len(moved) < len(IDS) / 4 * 1.2


def test_the_same_replica_in_another_process() -> None:
    """Python's own hash() differs between processes; the placement must not (several ingress replicas)."""
    script = ("from types import SimpleNamespace as N; from vfm.service.sam_routing import owner; import sys\n"
              "rs = [N(replica_id=N(unique_id=u)) for u in ('a1b2c3', 'd4e5f6', 'g7h8i9')]\n"
              "print(' '.join(owner(i, rs).replica_id.unique_id for i in sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, *IDS[:50]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [owner(i, ABC).name for i in IDS[:50]]


def test_a_routed_request_leaves_the_routers_indices() -> None:
    """Ray's own router code fulfils and cancels requests by image id; nothing of them (their arguments hold
    the image) may stay referenced afterwards, or the ingress grows by an image per SAM request."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from vfm.service.sam_routing import ImageIdRouter

    async def scenario() -> ImageIdRouter:
        router = ImageIdRouter(DeploymentID(name="sam", app_name="vfm"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state()
        routed = []
        for i in range(50):
            metadata = RequestMetadata(request_id=f"r{i}", internal_request_id=f"i{i}",
                                       multiplexed_model_id=IDS[i % 2])
            request = PendingRequest(args=[b"image bytes" * 1000], kwargs={}, metadata=metadata)
            router._add_pending_request_to_indices(request)
            routed.append(request)
        holder = replica("a1b2c3")
        for request in routed[:40]:  # Serve's path once a replica is found for a request
            router._fulfill_next_pending_request(holder, request.metadata)
            assert request.future.result() is holder
        for request in routed[40:]:  # a caller that gave up
            request.future.cancel()
            router._remove_pending_request_from_indices(request)
        return router

    router = asyncio.run(scenario())
    assert not router._pending_requests_by_id
    assert not router._pending_requests_by_model_id

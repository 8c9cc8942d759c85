"""Two SAM replicas share their work: every request for an image id goes to the replica that holds its embedding
(service/sam_routing.py), so prompts by id hit the cache; when that replica is killed, a prompt by id is a clean
404 unknown_image_id (or, with the image, is encoded again elsewhere), never a 500, and the service keeps working
once Serve has replaced it."""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from vfm.service.client import VfmClient
from vfm.service.sam_routing import owner

from conftest import MetricsReader

PAIR = "sam_pair"
# A 1 s batch wait: encodes sent together surely share a batch on a loaded machine (a full batch leaves at once).
SERVICE_MODELS = {PAIR: {"model": "tiny_sam", "replicas": 2, "num_cpus": 0.05, "max_batch_size": 4,
                         "batch_wait_timeout_s": 1.0, "health_check_period_s": 1}}
ENCODER = {"model": PAIR, "task": "encode"}
WATCHED = ("vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total", "vfm_batch_size_count")
REPLICA_PREFIX = "SERVE_REPLICA::vfm#model_sam_pair#"


class _Replica:  # what sam_routing.owner reads of a replica: replica_id.unique_id
    def __init__(self, actor_name: str):
        self.name = actor_name
        self.replica_id = type("Id", (), {"unique_id": actor_name.rsplit("#", 1)[1]})()


def replicas() -> list[_Replica]:
    """The running replicas of the pair, from the session's Ray (this process is its driver)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(REPLICA_PREFIX)]
    return [_Replica(name) for name in sorted(names)]


def prompt(client: VfmClient, image_id: str, image: bytes | None = None):
    return client.send("POST", f"/v1/models/{PAIR}/segment", image, image_id=image_id, points=[[10, 10]],
                       point_labels=[1], transport="json" if image is None else "multipart")


def counts(samples, before=None) -> tuple[float, float, float]:
    """(cache hits, cache misses, encoder batches) of the pair, minus those of ``before``."""
    value = MetricsReader.value
    now = (value(samples, "vfm_sam_cache_hits_total", model=PAIR),
           value(samples, "vfm_sam_cache_misses_total", model=PAIR),
           value(samples, "vfm_batch_size_count", **ENCODER))
    return now if before is None else tuple(a - b for a, b in zip(now, counts(before)))


def images_on_each(random_pngs, pair: list[_Replica], per_replica: int, seed: int) -> dict[str, list[bytes]]:
    """``per_replica`` distinct images whose ids the router places on each replica of ``pair`` (by actor name)."""
    found: dict[str, list[bytes]] = {r.name: [] for r in pair}
    for image in random_pngs(40 * per_replica, seed=seed):
        holder = owner(hashlib.sha256(image).hexdigest(), pair).name
        if len(found[holder]) < per_replica:
            found[holder].append(image)
    assert all(len(v) == per_replica for v in found.values())
    return found


def test_twenty_prompts_by_image_id_all_answer_from_the_cache(client: VfmClient, metrics, random_pngs) -> None:
    assert len(replicas()) == 2
    image_id = client.encode(PAIR, random_pngs(1, seed=31)[0])["image_id"]
    first = prompt(client, image_id)  # the first prompt right after the encode: no wait for any bookkeeping
    assert first.status_code == 200 and first.json()["cached"] is True, first.text
    before = metrics.settled(*WATCHED)
    with ThreadPoolExecutor(8) as pool:  # concurrently: the router's queue, not one request at a time
        answers = list(pool.map(lambda _: prompt(client, image_id), range(20)))
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["cached"] for a in answers)
    metrics.read(until=lambda s: counts(s, before)[0] >= 20)
    assert counts(metrics.settled(*WATCHED), before) == (20, 0, 0)  # 20 hits, no miss, no encoder batch


def test_encodes_of_different_images_share_encoder_batches(client: VfmClient, metrics, random_pngs) -> None:
    """Requests reach a replica keyed by their image id, and Serve's batching splits a batch by that key: the
    replica puts encodes into its queue without it, so different images still share one encoder run."""
    pair = replicas()
    together = images_on_each(random_pngs, pair, 4, seed=57)[pair[0].name]  # 4 images the router sends to one
    before = metrics.settled(*WATCHED, "vfm_batch_size_sum")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda image: client.encode(PAIR, image), together))
    assert [a["cached"] for a in answers] == [False] * 4
    after = metrics.read(until=lambda s: MetricsReader.value(s, "vfm_batch_size_sum", **ENCODER)
                         - MetricsReader.value(before, "vfm_batch_size_sum", **ENCODER) >= 4)
    images = MetricsReader.value(after, "vfm_batch_size_sum", **ENCODER) - MetricsReader.value(
        before, "vfm_batch_size_sum", **ENCODER)
    batches = counts(after, before)[2]
    assert images == 4 and batches <= 2, f"4 encodes ran in {batches} encoder batches"


def test_ids_on_both_replicas_hit_and_a_killed_holder_gives_404_never_500(client: VfmClient, metrics,
                                                                          random_pngs) -> None:
    pair = replicas()
    assert len(pair) == 2
    placed = images_on_each(random_pngs, pair, per_replica=3, seed=32)
    ids = {name: [client.encode(PAIR, image)["image_id"] for image in images] for name, images in placed.items()}
    before = metrics.settled(*WATCHED)
    for round_ in range(3):  # 18 prompts on 6 ids over both replicas: every one from the cache
        for name, found in ids.items():
            for image_id in found:
                answer = prompt(client, image_id)
                assert answer.status_code == 200 and answer.json()["cached"] is True, answer.text
    assert counts(metrics.settled(*WATCHED), before) == (18, 0, 0)

    victim, survivor = pair
    before = metrics.settled(*WATCHED)
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    # The killed replica's ids: gone with it, a clean 404 (send the image again); the survivor's: still cached.
    for image_id in ids[victim.name]:
        answer = prompt(client, image_id)
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["type"] == "unknown_image_id" and "send the image again" in error["message"]
    for image_id in ids[survivor.name]:
        answer = prompt(client, image_id)
        assert answer.status_code == 200 and answer.json()["cached"] is True, answer.text
    # With the image, a killed replica's id is encoded again on a running one, which holds it from then on.
    lost_image, lost_id = placed[victim.name][0], ids[victim.name][0]
    again = prompt(client, lost_id, lost_image)
    assert again.status_code == 200 and again.json()["cached"] is False, again.text
    assert prompt(client, lost_id).json()["cached"] is True
    # The 404s count as misses: 3 ids lost + 1 encoded again; hits: the survivor's 3 + the id encoded again.
    assert counts(metrics.settled(*WATCHED), before) == (4, 4, 1)

    deadline = time.monotonic() + 180
    while not (len(now := replicas()) == 2 and victim.name not in {r.name for r in now}
               and client.http.get("/readyz", timeout=30).status_code == 200):
        assert time.monotonic() < deadline, "Serve did not replace the killed replica within 180 s"
        time.sleep(0.5)
    # After the replacement: the ids held by the survivor stay there (the router remembers where it sent them)...
    for image_id in ids[survivor.name] + [lost_id]:
        answer = prompt(client, image_id)
        assert answer.status_code == 200 and answer.json()["cached"] is True, answer.text
    # ... and new images are spread over both replicas again, each prompt by id a hit.
    fresh = images_on_each(random_pngs, replicas(), per_replica=2, seed=33)
    before = metrics.settled(*WATCHED)
    for images in fresh.values():
        for image in images:
            image_id = client.encode(PAIR, image)["image_id"]
            answer = prompt(client, image_id)
            assert answer.status_code == 200 and answer.json()["cached"] is True, answer.text
    hits, misses, _ = counts(metrics.settled(*WATCHED), before)
    assert (hits, misses) == (4, 4)


@pytest.fixture(autouse=True)
def _driver(vfm_service) -> None:
    assert ray.is_initialized(), "the session's Ray is reachable from the test process"

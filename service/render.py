"""Deployment files rendered from one service config, so they cannot drift from it.

    vfm serve --render serve   --config configs/default.yaml > deploy/serve.yaml
    vfm serve --render kuberay --config configs/default.yaml > deploy/kuberay/rayservice.yaml
    vfm serve --render compose --config configs/default.yaml > docker-compose.yml

``serve`` is a Ray Serve config file (``serve deploy``/``serve run`` on an existing cluster): one
application built inside the cluster by ``vfm.service.app:build_app`` from the config, carried whole
as the application's ``args``. Each model's Serve options (replicas or autoscaling, CPUs, GPUs,
custom resources, queue limits) come from ``ModelConfig.serve_options()`` in that builder; the
file lists no per-deployment overrides, because Serve rejects an override for a deployment the
builder did not create, and the builder leaves out models whose weights cannot be had.
``kuberay`` is a RayService whose ``serveConfigV2`` is that same file. ``compose`` runs
``vfm serve --address auto`` on a Ray head with the config mounted read-only.

What the config decides comes from it: the port, the application name, the API key variable,
the heads and published models folders (compose: bind mounts; kuberay: read-only volume claims
``<app>-heads`` and ``<app>-models`` that you create, mounted where the config names them), the head's CPUs (what its CPU-only replicas reserve at start) and the most GPU
workers (what the models can ask for at their most replicas). The rest (images, worker pod
sizes) are the constants below. Output is deterministic: keys sorted, no timestamps.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .app import http_options, ray_env
from .config import ModelConfig, ServiceConfig

TARGETS = {"serve": "deploy/serve.yaml", "kuberay": "deploy/kuberay/rayservice.yaml", "compose": "docker-compose.yml"}

BUILDER = "vfm.service.app:build_app"
CLUSTER_HOST = "0.0.0.0"          # inside a container or pod; what is published is decided outside it
CONFIG_PATH = "/etc/vfm/config.yaml"
CACHE_DIR = "/var/cache/vfm"       # VFM_CACHE of both images (a volume)
WORKDIR = "/srv/vfm"               # the images' working directory: relative paths of the config start here
PUBLISHED_MODELS = "published"     # the published models folder mounted where the config names none (models_dir)
USER_ID = 10001                    # the images' non-root user
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
HEALTHCHECK = ["python", "/usr/local/lib/vfm/healthcheck.py", CONFIG_PATH]
HEAD_MEMORY_GIB_PER_CPU = 4
HEAD_MIN_CPUS = 2
GPU_WORKER = {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"}   # one GPU per worker pod
GPUS_PER_WORKER = 1


def images() -> dict[str, str]:
    from vfm import __version__

    return {"cpu": f"vfm:{__version__}", "gpu": f"vfm:{__version__}-gpu"}


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# ---- what the config asks of a cluster ------------------------------------------------------

def replicas(mc: ModelConfig) -> tuple[int, int]:
    """(replicas at start, most replicas) of a model, by the rule ``serve_options`` gives Serve."""
    opts = mc.serve_options()
    auto = opts.get("autoscaling_config")
    return (auto["initial_replicas"], auto["max_replicas"]) if auto else (opts["num_replicas"],) * 2


def head_cpus(cfg: ServiceConfig) -> int:
    """CPUs for a head that holds the ingress and every CPU-only replica at start."""
    need = cfg.ingress.num_cpus * cfg.ingress.replicas
    need += sum(mc.num_cpus * replicas(mc)[0] for mc in cfg.models.values() if mc.num_gpus == 0)
    return max(HEAD_MIN_CPUS, math.ceil(need))


def max_gpu_workers(cfg: ServiceConfig) -> int:
    """GPU workers the models can fill at their most replicas (at least one, so the group exists)."""
    peak = sum(mc.num_gpus * replicas(mc)[1] for mc in cfg.models.values())
    return max(1, math.ceil(peak / GPUS_PER_WORKER))


def dns_name(name: str) -> str:
    """A Kubernetes / compose name (RFC 1123 label) for the application name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "vfm"


def _mount(folder: str) -> tuple[str, str]:
    """(host source, container target) of a folder of the config: relative paths start at WORKDIR."""
    path = Path(folder)
    if path.is_absolute():
        return str(path), str(path)
    return f"./{path.as_posix()}", f"{WORKDIR}/{path.as_posix()}"


def _heads_mount(cfg: ServiceConfig) -> tuple[str, str]:
    """(host source, container target) of the heads folder."""
    return _mount(cfg.heads_dir)


def _models_mount(cfg: ServiceConfig) -> tuple[str, str]:
    """(host source, container target) of the published models folder (`vfm finetune publish`): the
    config's ``models_dir``, else ``PUBLISHED_MODELS`` (the container's $VFM_MODELS_DIR points there)."""
    return _mount(cfg.models_dir or PUBLISHED_MODELS)


# ---- serve ----------------------------------------------------------------------------------

def serve_config(cfg: ServiceConfig) -> dict[str, Any]:
    """The Ray Serve config (``ServeDeploySchema``) of the config's application."""
    args = cfg.model_dump(mode="json", exclude_unset=True, exclude={"host", "port", "address"})
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg, host=CLUSTER_HOST),
        "applications": [{"name": cfg.app_name, "route_prefix": "/", "import_path": BUILDER, "args": args}],
    }


# ---- KubeRay --------------------------------------------------------------------------------

def _env(cfg: ServiceConfig) -> dict[str, Any]:
    """The container's ``env``: Ray's settings for Serve's processes (``app.ray_env``: the node's raylet starts them
    with this environment), and the API key variable, from a Secret you create (optional: no Secret, no key)."""
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in ray_env(cfg).items()]
    if cfg.api_key_env:
        env.append({"name": cfg.api_key_env, "valueFrom": {"secretKeyRef": {
            "name": f"{dns_name(cfg.app_name)}-api-key", "key": "api-key", "optional": True}}})
    return {"env": env}


def claim_names(cfg: ServiceConfig) -> dict[str, str]:
    """The PersistentVolumeClaims (you create them) that hold the heads and the published models on
    KubeRay: volume name -> claim name, named after the application."""
    return {"heads": f"{dns_name(cfg.app_name)}-heads", "models": f"{dns_name(cfg.app_name)}-models"}


def _kuberay_mounts(cfg: ServiceConfig) -> list[dict[str, Any]]:
    """The model cache, and the heads and published models folders read-only where the config names them
    (relative paths under WORKDIR), as compose mounts them."""
    return [{"name": "model-cache", "mountPath": CACHE_DIR},
            {"name": "heads", "mountPath": _heads_mount(cfg)[1], "readOnly": True},
            {"name": "models", "mountPath": _models_mount(cfg)[1], "readOnly": True}]


def _pod_spec(cfg: ServiceConfig, container: dict[str, Any], **extra: Any) -> dict[str, Any]:
    claims = [{"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
              for volume, claim in claim_names(cfg).items()]
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID},
        "containers": [container],
        "volumes": [{"name": "model-cache", "emptyDir": {}}, *claims],
        **extra,
    }


def rayservice(cfg: ServiceConfig) -> dict[str, Any]:
    """A RayService: the serve config above on a head group + an autoscaled GPU worker group."""
    image = images()["gpu"]   # one image for every node: Ray wants the same Python on all of them
    cache = _kuberay_mounts(cfg)
    models_dir = [{"name": "VFM_MODELS_DIR", "value": _models_mount(cfg)[1]}]  # as compose sets it
    cpus = head_cpus(cfg)
    head_resources = {"cpu": str(cpus), "memory": f"{cpus * HEAD_MEMORY_GIB_PER_CPU}Gi"}
    head = {
        "name": "ray-head", "image": image, "env": _env(cfg)["env"] + models_dir, "volumeMounts": cache,
        "ports": [{"name": "gcs-server", "containerPort": GCS_PORT},
                  {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                  {"name": "client", "containerPort": CLIENT_PORT},
                  {"name": "serve", "containerPort": cfg.port}],
        "resources": {"requests": head_resources, "limits": head_resources},
    }
    worker = {
        "name": "ray-worker", "image": image, "env": _env(cfg)["env"] + models_dir, "volumeMounts": cache,
        "ports": [{"name": "serve", "containerPort": cfg.port}],
        # The head keeps KubeRay's own probes: KubeRay deploys the application only once the head
        # is ready, so a head waiting for /readyz would never be. Workers serve traffic once ready.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": cfg.port}, "periodSeconds": 10,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": {"requests": dict(GPU_WORKER), "limits": dict(GPU_WORKER)},
    }
    most = max_gpu_workers(cfg)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": dns_name(cfg.app_name)},
        "spec": {
            "serveConfigV2": _Literal(_dump(serve_config(cfg))),
            "rayClusterConfig": {
                "rayVersion": _ray_version(),
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 300,
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}},
                },
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": CLUSTER_HOST, "num-gpus": "0"},
                    "template": {"spec": _pod_spec(cfg, head)},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": 0,
                    "minReplicas": 0,
                    "maxReplicas": most,
                    "rayStartParams": {},
                    "template": {"spec": _pod_spec(cfg, worker, tolerations=[
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])},
                }],
            },
        },
    }


# ---- docker compose -------------------------------------------------------------------------

def _node(image_kind: str, command: list[str], cfg: ServiceConfig, config_source: str,
          healthcheck: dict[str, Any], profile: str) -> dict[str, Any]:
    heads_source, heads_target = _heads_mount(cfg)
    models_source, models_target = _models_mount(cfg)
    env = {"RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to a random secret, see README.md, Run on a cluster}",
           **ray_env(cfg),
           # where `vfm predict` in the container and the service (after the config's models_dir) look
           "VFM_MODELS_DIR": models_target}
    if cfg.api_key_env:
        env[cfg.api_key_env] = f"${{{cfg.api_key_env}:-}}"
    dockerfile = "deploy/docker/Dockerfile" + ("" if image_kind == "cpu" else ".gpu")
    return {
        "profiles": [profile],
        "image": images()[image_kind],
        "build": {"context": ".", "dockerfile": dockerfile},
        "command": command,
        "environment": env,
        "volumes": [
            {"type": "volume", "source": "model-cache", "target": CACHE_DIR},
            {"type": "bind", "source": config_source, "target": CONFIG_PATH, "read_only": True},
            {"type": "bind", "source": heads_source, "target": heads_target, "read_only": True,
             "bind": {"create_host_path": True}},
            {"type": "bind", "source": models_source, "target": models_target, "read_only": True,
             "bind": {"create_host_path": True}},
        ],
        "healthcheck": healthcheck,
        "restart": "unless-stopped",
        "init": True,
        "shm_size": "2gb",   # Ray's object store lives in /dev/shm (64 MB by default in Docker)
        "ulimits": {"nofile": {"soft": 65536, "hard": 65536}},
    }


def _head(image_kind: str, cfg: ServiceConfig, config_source: str, profile: str) -> dict[str, Any]:
    start = (f"ray start --head --port={GCS_PORT} --dashboard-host={CLUSTER_HOST} --dashboard-port={DASHBOARD_PORT}"
             f" --num-gpus=0 --disable-usage-stats && exec vfm serve --config {CONFIG_PATH} --host {CLUSTER_HOST}"
             " --address auto")
    healthcheck = {"test": ["CMD", *HEALTHCHECK], "interval": "30s", "timeout": "10s", "retries": 3,
                   "start_period": "600s"}   # first start downloads weights
    head = _node(image_kind, ["bash", "-c", start], cfg, config_source, healthcheck, profile)
    head["ports"] = [f"{cfg.host}:{cfg.port}:{cfg.port}", f"127.0.0.1:{DASHBOARD_PORT}:{DASHBOARD_PORT}"]
    head["stop_grace_period"] = "60s"
    return head


def compose(cfg: ServiceConfig, config_source: str) -> dict[str, Any]:
    """Profile ``gpu``: a head + GPU workers (one image, so one Python); ``cpu``: a head alone, for a laptop."""
    worker_command = ["ray", "start", f"--address=head:{GCS_PORT}", "--block", "--disable-usage-stats"]
    worker_health = {"test": ["CMD", "ray", "health-check", f"--address=head:{GCS_PORT}"], "interval": "30s",
                     "timeout": "10s", "retries": 3, "start_period": "60s"}
    worker = _node("gpu", worker_command, cfg, config_source, worker_health, "gpu")
    # Not `service_healthy`: the head is ready only once GPU replicas run, which needs the workers.
    worker["depends_on"] = {"head": {"condition": "service_started"}}
    worker["deploy"] = {
        "replicas": max_gpu_workers(cfg),
        "resources": {"reservations": {"devices": [{"driver": "nvidia", "count": GPUS_PER_WORKER,
                                                    "capabilities": ["gpu"]}]}},
    }
    return {
        "name": dns_name(cfg.app_name),
        "services": {
            "head": _head("gpu", cfg, config_source, "gpu"),
            "gpu-worker": worker,
            "head-cpu": _head("cpu", cfg, config_source, "cpu"),
        },
        "volumes": {"model-cache": {}},
    }


# ---- YAML out -------------------------------------------------------------------------------

class _Literal(str):
    """A string written as a YAML block (``|``): the serveConfigV2 text."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:   # no &id001 anchors: every value written where it is used
        return True


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=120, allow_unicode=True)


def _header(kind: str, source: str) -> str:
    return (f"# rendered by `vfm serve --render {kind}` from {source} — do not edit by hand;\n"
            f"# change the config, then: vfm serve --render {kind} --config {source} > {TARGETS[kind]}\n")


RENDERERS: dict[str, Callable[[ServiceConfig, str], dict[str, Any]]] = {
    "serve": lambda cfg, source: serve_config(cfg),
    "kuberay": lambda cfg, source: rayservice(cfg),
    "compose": compose,
}


def render(kind: str, cfg: ServiceConfig, source: str) -> str:
    """The file of ``kind`` for ``cfg`` read from ``source`` (a path relative to the repository root)."""
    if kind not in RENDERERS:
        raise ValueError(f"unknown render {kind!r}; choose one of {', '.join(RENDERERS)}")
    config_source = source if Path(source).is_absolute() else f"./{Path(source).as_posix()}"
    return _header(kind, source) + _dump(RENDERERS[kind](cfg, config_source))

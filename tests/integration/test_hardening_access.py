"""Access: admin routes need the API key (compared in constant time), else 401; no route fetches a URL it
is given; heads and checkpoints load only from safetensors or weights_only (a pickle or a symlink out of
the heads folder is refused, and nothing in it runs); CORS is off unless configured."""
from __future__ import annotations

import asyncio
import base64
import inspect
import pickle
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

from vfm.models.heads import KNNHead, save_head
from vfm.service.client import VfmClient

from hardening_tools import PNG_HEADERS
from test_errors import assert_error

ALLOWED_ORIGIN = "http://dashboard.example"
SERVICE_SETTINGS = {"cors_origins": [ALLOWED_ORIGIN]}
RELOAD = "/v1/admin/heads/reload"


# ---- the API key ----------------------------------------------------------------------------

def key_variants(key: str) -> dict[str, dict[str, Any]]:
    return {
        "one-char-short": {"headers": {"Authorization": f"Bearer {key[:-1]}"}},
        "one-char-long": {"headers": {"Authorization": f"Bearer {key}x"}},
        "no-space": {"headers": {"Authorization": f"Bearer{key}"}},
        "basic-scheme": {"headers": {"Authorization": f"Basic {key}"}},
        "bare-bearer": {"headers": {"Authorization": "Bearer"}},
        "wrong-x-api-key": {"headers": {"X-API-Key": key.upper() if key.upper() != key else key + "A"}},
        "non-ascii-bytes": {"headers": {"Authorization": b"Bearer \xff\xfe\xc3\xbc"}},
        "8kb-key": {"headers": {"Authorization": "Bearer " + "k" * 8192}},
        "key-in-query": {"params": {"api_key": key, "key": key}},
        "key-in-json-body": {"json": {"api_key": key}},
        "key-in-cookie": {"headers": {"Cookie": f"api_key={key}"}},
    }


@pytest.mark.parametrize("variant", list(key_variants("k")))
def test_admin_route_refuses_every_wrong_key(client: VfmClient, api_key: str, variant: str) -> None:
    response = client.http.post(RELOAD, **key_variants(api_key)[variant])
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    ok = client.http.post(RELOAD, headers={"Authorization": f"bearer {api_key}"})  # the scheme is case-blind
    assert ok.status_code == 200 and "loaded" in ok.json()


def test_the_key_is_compared_in_constant_time() -> None:
    from vfm.service.ingress import Ingress

    source = inspect.getsource(Ingress.authorize)
    assert "hmac.compare_digest(" in source and "== self.api_key" not in source


def _app(cfg: Any) -> Any:
    """The real FastAPI app of an Ingress built from ``cfg`` (no models, no Ray: routes without replicas)."""
    from vfm.service.api import build_http_app
    from vfm.service.ingress import Ingress

    async def make() -> Any:
        ingress = object.__new__(Ingress)
        await ingress.__init__(cfg, {}, {}, None)  # type: ignore[misc]
        return build_http_app(ingress)

    return asyncio.run(make())


async def _asgi(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vfm") as http:
        return await http.request(method, path, **kwargs)


def test_with_scope_all_every_api_route_needs_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vfm.service.config import ServiceConfig

    monkeypatch.setenv("VFM_HARDENING_KEY", "s3cret-key")
    cfg = ServiceConfig(api_key_env="VFM_HARDENING_KEY", api_key_scope="all", heads_dir=str(tmp_path))
    app = _app(cfg)
    for path in ("/v1/models", "/v1/heads"):
        assert_error(asyncio.run(_asgi(app, "GET", path)), 401, "unauthorized")
        assert_error(asyncio.run(_asgi(app, "GET", path, headers={"X-API-Key": "s3cret-kez"})), 401, "unauthorized")
        assert asyncio.run(_asgi(app, "GET", path, headers={"X-API-Key": "s3cret-key"})).status_code == 200
    assert asyncio.run(_asgi(app, "GET", "/healthz")).status_code == 200  # probes stay open


# ---- no SSRF --------------------------------------------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it gets (it should get none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def test_no_route_fetches_a_url_it_is_given(client: VfmClient, api_key: str, small_png: bytes,
                                            listener: Listener) -> None:
    url = f"http://127.0.0.1:{listener.port}/cat.jpg"
    b64 = base64.b64encode(small_png).decode()
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/v1/models/tiny_cnn/predict", {"json": {"image": url}}, 400, "bad_request"),
        ("/v1/models/tiny_cnn/predict", {"json": {"image": url.replace("http", "https")}}, 400, "bad_request"),
        ("/v1/models/tiny_cnn/predict", {"json": {"image": f"data:image/png;base64,{url}"}}, 400, "bad_request"),
        ("/v1/models/tiny_cnn/predict", {"files": {"image": (None, url)}}, 400, "bad_request"),
        ("/v1/models/tiny_cnn/predict", {"json": {"image": b64, "image_url": url}}, 422, "invalid_options"),
        ("/v1/models/tiny_cnn/predict", {"params": {"url": url}, "content": small_png, "headers": PNG_HEADERS},
         422, "invalid_options"),
        ("/v1/models/tiny_cnn/predict", {"params": {"image": url}}, 400, "missing_image"),
        ("/v1/models/tiny_cnn/predict", {"content": url.encode(), "headers": PNG_HEADERS}, 415, "not_an_image"),
        ("/v1/models/tiny_cnn/predict", {"content": url.encode(), "headers": {"Content-Type": "text/uri-list"}},
         415, "unsupported_media_type"),
        ("/v1/models/tiny_sam/segment", {"json": {"image_id": url, "box": [0, 0, 5, 5]}}, 422, "invalid_options"),
        ("/v1/models/tiny_vit/embed", {"json": {"image": url}}, 400, "bad_request"),
        ("/v1/models/tiny_sam/encode", {"json": {"image": url}}, 400, "bad_request"),
    ]
    for path, kwargs, status, kind in cases:
        assert_error(client.http.post(path, **kwargs), status, kind)
    reload = client.http.post(RELOAD, json={"folder": url, "url": url}, headers={"X-API-Key": api_key})
    assert reload.status_code == 200 and url not in reload.text
    time.sleep(0.5)  # a fetch started by any of these would have connected by now
    assert listener.connections == 0
    assert client.predict("tiny_cnn", small_png)["predictions"]


# ---- heads and checkpoints: safetensors or weights_only, nothing else runs -------------------

class RunsCode:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_pickled_or_escaping_head_is_refused_and_runs_nothing(client: VfmClient, heads: Path, api_key: str,
                                                                tmp_path: Path, small_png: bytes,
                                                                random_pngs) -> None:
    marker = tmp_path / "pickle-ran"
    other = random_pngs(1, seed=31)[0]
    features = np.asarray([client.embed("tiny_cnn", image)["embedding"] for image in (small_png, other)], np.float32)
    meta = {"backbone": "tiny_cnn", "embed": {"normalize": False}}
    outside = tmp_path / "outside"
    save_head(KNNHead(["x", "y"], features, np.arange(2), k=1), outside, meta)
    save_head(KNNHead(["good", "other"], features, np.arange(2), k=1), heads / "good", meta)
    for name in ("pickled_tensors", "pickle_only", "tensors_link_out", "json_link_out"):
        shutil.copytree(outside, heads / name)
    torch.save({"weight": RunsCode(marker)}, heads / "pickled_tensors" / "head.safetensors")
    (heads / "pickle_only" / "head.safetensors").unlink()
    (heads / "pickle_only" / "head.pt").write_bytes(pickle.dumps({"weight": RunsCode(marker)}))
    (heads / "tensors_link_out" / "head.safetensors").unlink()
    (heads / "tensors_link_out" / "head.safetensors").symlink_to(outside / "head.safetensors")
    (heads / "json_link_out" / "head.json").unlink()
    (heads / "json_link_out" / "head.json").symlink_to(outside / "head.json")
    (heads / "folder_link_out").symlink_to(outside, target_is_directory=True)

    report = client.http.post(RELOAD, headers={"Authorization": f"Bearer {api_key}"}).json()
    listed = {h["name"]: h for h in report["heads"]}
    assert (report["loaded"], report["invalid"]) == (1, 5), listed
    assert listed["good"]["status"] == "ready"
    reasons = {name: listed[name]["reason"] for name in listed if name != "good"}
    assert "safetensors" in reasons["pickled_tensors"]
    assert "head.safetensors is missing" in reasons["pickle_only"]
    for name in ("tensors_link_out", "json_link_out", "folder_link_out"):
        assert "symlink" in reasons[name], reasons[name]
    assert not marker.exists(), "loading the heads folder ran a pickle"
    for name in reasons:
        assert_error(client.send("POST", f"/v1/heads/{name}/predict", small_png), 503, "head_unavailable")
    assert client.head_predict("good", small_png)["predictions"][0]["label"] == "good"


def test_a_checkpoint_that_would_run_code_makes_its_model_unavailable_not_the_service(tmp_path: Path) -> None:
    from vfm.service.app import absolutize, plan_service
    from vfm.service.config import parse_config

    marker = tmp_path / "pickle-ran"
    torch.save({"weight": RunsCode(marker)}, tmp_path / "zip.pt")
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump({"weight": RunsCode(marker)}, f, protocol=2)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "fine.pt")
    plan = plan_service(absolutize(parse_config({"models": {
        "zip": {"model": "tiny_cnn", "weights": str(tmp_path / "zip.pt")},
        "legacy": {"model": "tiny_cnn", "weights": str(tmp_path / "legacy.pt")},
        "tiny_cnn": {},
    }})))
    assert plan.deployable == ["tiny_cnn"]
    for name in ("zip", "legacy"):
        assert plan.entries[name].status == "unavailable"
        assert "Refused" in plan.entries[name].reason and "safetensors" in plan.entries[name].reason
    assert not marker.exists(), "planning the service ran a pickle"


# ---- CORS -----------------------------------------------------------------------------------

def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    from vfm.service.config import ServiceConfig

    cfg = ServiceConfig(heads_dir=str(tmp_path))
    assert cfg.cors_origins == []
    app = _app(cfg)
    plain = asyncio.run(_asgi(app, "GET", "/healthz", headers={"Origin": ALLOWED_ORIGIN}))
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    preflight = asyncio.run(_asgi(app, "OPTIONS", "/v1/models/tiny_cnn/predict", headers=_preflight(ALLOWED_ORIGIN)))
    assert_error(preflight, 405, "method_not_allowed")
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(client: VfmClient, small_png: bytes) -> None:
    preflight = client.http.options("/v1/models/tiny_cnn/predict", headers=_preflight(ALLOWED_ORIGIN))
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = client.http.post("/v1/models/tiny_cnn/predict", content=small_png,
                              headers={**PNG_HEADERS, "Origin": ALLOWED_ORIGIN})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    for origin in ("http://evil.example", "null", ALLOWED_ORIGIN + ".evil.example"):
        refused = client.http.options("/v1/models/tiny_cnn/predict", headers=_preflight(origin))
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        plain = client.http.get("/healthz", headers={"Origin": origin})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers

import hashlib
import http.server
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from vfm.models.checkpoints import UnsafeCheckpoint, load_state_dict, save_state_dict

from vfm.models.weights import UrlWeights, WeightsUnavailable, parse_source, resolve_weights


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VFM_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "cache"


def test_safetensors_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    save_state_dict(state, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_plain_torch_state_dict_loads(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vfm-pwned-by-pickle",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = Path("/tmp/vfm-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Exploit()}, f)
    with pytest.raises(UnsafeCheckpoint, match="Refused"):
        load_state_dict(path)
    torch_path = tmp_path / "evil_torch.pt"
    torch.save({"w": _Exploit()}, torch_path)
    with pytest.raises(UnsafeCheckpoint):
        load_state_dict(torch_path)
    assert not marker.exists()


def test_missing_weights_offline_says_where_to_put_them(offline_cache):
    source = UrlWeights("https://example.invalid/models/thing_abc123.pth", sha256="abc123")
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights("thing", source)
    msg = str(info.value)
    assert "'thing'" in msg and "VFM_OFFLINE=1" in msg
    assert str(offline_cache / "thing" / "thing_abc123.pth") in msg
    assert "https://example.invalid/models/thing_abc123.pth" in msg


def test_cache_hit_is_checked_against_sha256(offline_cache):
    body = b"not really weights"
    digest = hashlib.sha256(body).hexdigest()
    source = UrlWeights("https://example.invalid/w.bin", sha256=digest)
    target = offline_cache / "thing" / "w.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(body)
    assert resolve_weights("thing", source) == target
    target.write_bytes(b"tampered")
    with pytest.raises(WeightsUnavailable):
        resolve_weights("thing", source)


def test_explicit_local_path_and_random(tmp_path, offline_cache):
    path = tmp_path / "mine.safetensors"
    save_state_dict({"w": torch.zeros(1)}, path)
    source = UrlWeights("https://example.invalid/w.bin")
    assert resolve_weights("thing", source, explicit=str(path)) == path
    assert resolve_weights("thing", source, explicit="random") is None
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        resolve_weights("thing", source, explicit=str(tmp_path / "nope.pth"))


def test_parse_source_forms():
    assert parse_source("hf:facebook/dinov2-small").repo_id == "facebook/dinov2-small"
    assert parse_source("hf:org/name@v1").revision == "v1"
    url = parse_source("https://host/x.pth#sha256=ABCDEF01")
    assert url.sha256 == "abcdef01" and url.url == "https://host/x.pth"
    with pytest.raises(ValueError, match="sha256"):
        parse_source("https://host/x.pth")
    with pytest.raises(ValueError):
        parse_source("hf:nodash")


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"weights-bytes" * 1000

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_writes_atomically(tmp_path, monkeypatch, loopback_server):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VFM_OFFLINE", raising=False)
    good = hashlib.sha256(_Handler.body).hexdigest()
    path = resolve_weights("dl", UrlWeights(f"{loopback_server}/w.bin", sha256=good))
    assert path.read_bytes() == _Handler.body
    with pytest.raises(WeightsUnavailable, match="sha256 mismatch"):
        resolve_weights("dl2", UrlWeights(f"{loopback_server}/w.bin", sha256="0" * 64))
    folder = tmp_path / "cache" / "dl2"
    assert not folder.exists() or not any(folder.iterdir())  # no partial file left behind

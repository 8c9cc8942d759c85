"""``http: {front: haproxy}``: Ray's HAProxy listens on the service's port and forwards each request to the ingress
replica's own HTTP server (Serve's direct ingress), with no Serve proxy actor between them (docs/decisions.md).

The session runs with this front when this module is collected (``SERVICE_SETTINGS``). HAProxy's files are in a
folder of this Ray's own, not Ray's machine-wide /tmp/haproxy-serve, so other Rays on the machine cannot clash.
"""
from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import httpx
from conftest import descendants
from hardening_tools import ingress_pid

from vfm.service.client import VfmClient

SERVICE_SETTINGS = {"http": {"front": "haproxy"}}


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


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
    """TCP ports ``pid`` listens on."""
    mine = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _listeners_of(port: int) -> set[int]:
    """The processes (of this session's Ray) that listen on ``port``: one HAProxy, two while a reload hands the
    socket over."""
    inodes = _listening_inodes(port)
    return {pid for pid in descendants(os.getpid()) if _socket_inodes(pid) & inodes}


def test_haproxy_of_this_ray_listens_on_the_port_and_forwards_to_the_ingress_replica(vfm_service) -> None:
    port = int(vfm_service.url.rsplit(":", 1)[1])
    listeners = _listeners_of(port)
    commands = [_cmdline(pid) for pid in listeners]
    assert commands and all(Path(c[0]).name == "haproxy" for c in commands), commands   # no Serve proxy actor
    command = commands[0]
    config = Path(command[command.index("-f") + 1])
    assert config.parent.parent.name.startswith("vfm-haproxy-"), config   # its own folder, not /tmp/haproxy-serve
    # The ingress replica answers HTTP itself, on a port of its own: the one server of the app's backend (Serve's
    # proxy actor is only its backup, for when no ingress replica is up).
    servers = re.findall(r"^\s*server \S+ [\d.]+:(\d+) (.*)$", config.read_text(), re.M)
    primary = {int(port) for port, flags in servers if "backup" not in flags.split()}
    assert primary and primary <= _listening_ports(ingress_pid()), (servers, _listening_ports(ingress_pid()))


def test_request_ids_404_and_health_through_haproxy(client: VfmClient, small_png: bytes) -> None:
    mine = f"test-{uuid.uuid4()}"
    answer = client.http.post("/v1/models/tiny_cnn/predict", content=small_png,
                              headers={"Content-Type": "image/png", "X-Request-ID": mine})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == mine, answer.text
    made = client.http.post("/v1/models/tiny_cnn/predict", content=small_png, headers={"Content-Type": "image/png"})
    assert made.status_code == 200 and made.headers.get("x-request-id") not in (None, "", mine)
    missing = client.http.get("/v1/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    unknown = client.http.post("/v1/models/no_such_model/predict", content=small_png,
                               headers={"Content-Type": "image/png"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_model"
    healthz = client.http.get("/-/healthz")   # answered by HAProxy: an ingress replica is up
    assert healthz.status_code == 200, healthz.text
    assert client.http.get("/readyz").status_code == 200


async def _burst(url: str, image: bytes, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=count)) as http:
        return await asyncio.gather(*(http.post("/v1/models/test/slow_cnn/predict", content=image,
                                                headers={"Content-Type": "image/png"}) for _ in range(count)))


def test_an_overloaded_model_is_a_json_503_with_retry_after_through_haproxy(service_url: str,
                                                                            small_png: bytes) -> None:
    # test/slow_cnn (conftest) takes 2 requests at a time and queues 2: a burst of 8 has refusals.
    answers = asyncio.run(_burst(service_url, small_png, 8))
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.json()["error"]["type"] == "overloaded" and a.headers.get("retry-after")
                           for a in refused), [(a.status_code, a.text[:80]) for a in answers]
    assert {a.status_code for a in answers} <= {200, 503, 504}

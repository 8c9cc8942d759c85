"""The processes of the serving path run as the service set them up (docs/decisions.md, "The serving path").

A Ray that vfm starts runs Serve's proxy and every replica at default priority (Ray's default niceness
of 15 loses the CPU to any other process on the machine) and with Serve's one-event-loop-per-process
settings (``app.RAY_ENV``); the answers of the hot path are JSON rendered by orjson.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import descendants
from hardening_tools import ingress_pid, replica_pids

from vfm.service.app import RAY_ENV
from vfm.service.client import VfmClient


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").partition("=")[::2] for p in pairs if b"=" in p)


def _proxy_pid() -> int:
    pids = [pid for pid in descendants(os.getpid()) if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ProxyActor")]
    assert len(pids) == 1, pids
    return pids[0]


def test_the_proxy_the_ingress_and_the_model_replicas_run_at_default_priority_with_one_loop(
        vfm_service) -> None:
    processes = {"proxy": _proxy_pid(), "ingress": ingress_pid(), "tiny_cnn": replica_pids("tiny_cnn")[0]}
    for role, pid in processes.items():
        assert _niceness(pid) == 0, f"{role} (pid {pid}) runs at niceness {_niceness(pid)}"
        environment = _environment(pid)
        assert {key: environment.get(key) for key in RAY_ENV} == RAY_ENV, role


def test_an_embedding_answer_is_strict_json_with_every_float(client: VfmClient, small_png: bytes) -> None:
    response = client.send("POST", "/v1/models/tiny_cnn/embed", small_png, transport="raw")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = json.loads(response.content, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert answer["dim"] == len(answer["embedding"]) > 0
    assert all(isinstance(x, float) for x in answer["embedding"])

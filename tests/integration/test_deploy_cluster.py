"""Run on a cluster, for real: a two-node Ray cluster on this machine serves a vfm config.

`ray start --head` and a second `ray start --address` node form the cluster; each node offers one
unit of the custom resource `fake_gpu`, standing in for a GPU. The cluster is this test's own:
its own ports, temp dirs and token (Ray's token auth, as the compose file and the RayService turn
on), so other Ray instances on the machine are never touched, and it is stopped by the pids of
the `ray start --block` processes that started it, never by `ray stop`.

Both nodes share the machine's loopback, so Serve runs its HTTP proxy on the head only
(`serve start --proxy-location HeadOnly`, on 127.0.0.1); replicas still run on both nodes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import httpx
import pytest
import yaml

from vfm.service.client import VfmClient, VfmError
from vfm.service.config import parse_config
from vfm.service.render import render

from conftest import descendants, free_port, wait_gone  # noqa: E402  (this folder's conftest)

BIN = Path(sys.executable).parent
APP_PLACEMENT = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: {"alive": n["Alive"], "port": n["NodeManagerPort"]} for n in ray.nodes()}
replicas = [{"id": a["ActorID"], "deployment": a["ActorClassName"].rsplit(":", 1)[-1], "node": a["Address"]["NodeID"]}
            for a in state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"].startswith("ServeReplica:")]
print(json.dumps({"nodes": nodes, "replicas": replicas, "available": ray.available_resources(),
                  "total": ray.cluster_resources()}))
"""


@dataclass
class Node:
    """A Ray node started by `ray start --block` (the process whose children are the node)."""

    proc: subprocess.Popen
    log: IO[str]
    manager_port: int

    def id_in(self, placement: dict[str, Any]) -> str:
        return next(n for n, info in placement["nodes"].items() if info["port"] == self.manager_port)

    def raylet_pid(self) -> int:
        for pid in descendants(self.proc.pid):
            try:
                if "/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_text():
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no raylet below `ray start` {self.proc.pid}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    http_port: int
    head: Node
    worker: Node

    def placement(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-c", APP_PLACEMENT, self.address], env=self.env, capture_output=True,
                             text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-3000:]
        # Ray may print its own warnings (e.g. lagging heartbeats of a dying node) after our one JSON line.
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        assert lines, out.stdout[-3000:]
        return json.loads(lines[-1])


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def _start_node(args: list[str], tmp: Path, name: str, env: dict[str, str]) -> Node:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    ports = _ports(len(names))
    log = (tmp / f"{name}.log").open("w+")
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp / name}",
           "--object-store-memory=150000000", "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
           *(f"{n}={p}" for n, p in zip(names, ports)), *args]
    return Node(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, ports[0])


def _wait(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (httpx.HTTPError, VfmError, AssertionError) as exc:
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s (last: {last!r})")


def _run(cmd: list[str], env: dict[str, str], timeout_s: float = 120) -> None:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tmp = Path(tempfile.mkdtemp(prefix="vfm-mn-", dir="/tmp"))   # short: Ray's socket paths must fit 107 bytes
    cache = tmp / "cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "VFM_OFFLINE": "1",
                "VFM_CACHE": str(cache), "TORCH_HOME": str(cache), "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1"})
    gcs_port, client_port, http_port = _ports(3)
    address = f"127.0.0.1:{gcs_port}"
    head = _start_node(["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                        "--include-dashboard=false", "--num-cpus=2", '--resources={"fake_gpu": 1}'], tmp, "head", env)
    started = [head.proc]
    worker = None
    try:
        _wait("the head's GCS", lambda: subprocess.run([str(BIN / "ray"), "health-check", f"--address={address}"],
                                                       env=env, capture_output=True, timeout=30).returncode == 0,
              timeout_s=90, every_s=2)
        worker = _start_node([f"--address={address}", "--num-cpus=2", '--resources={"fake_gpu": 1}'], tmp, "worker",
                             env)
        started.append(worker.proc)
        c = Cluster(address, env, http_port, head, worker)
        _wait("two alive nodes", lambda: sum(n["alive"] for n in c.placement()["nodes"].values()) == 2, timeout_s=90,
              every_s=2)
        _run([str(BIN / "serve"), "start", f"--address={address}", "--http-host=127.0.0.1",
              f"--http-port={http_port}", "--proxy-location=HeadOnly"], env)
        yield c
    except BaseException:
        for node in filter(None, (head, worker)):
            print(f"--- `ray start` {node.proc.pid} ---\n{node.tail()}")
        raise
    finally:
        processes = {}
        for proc in started:
            processes.update(descendants(proc.pid))
        for proc in reversed(started):   # the worker first, then the head; `ray start --block` stops its node
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in wait_gone(processes, 30):   # what a dead node left behind, by pid (start time checked)
            os.kill(pid, signal.SIGKILL)
        left = wait_gone(processes, 15)
        for node in filter(None, (head, worker)):
            node.log.close()
        assert not left, f"processes of the test cluster still alive: {left}"
        shutil.rmtree(tmp, ignore_errors=True)


def _config(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "ingress": {"num_cpus": 0.05}, "metrics_flush_s": 0.25,
            "models": {
                # The "GPU model": every replica holds half a fake_gpu, so two fit on either node.
                "tiny_cnn": {"num_cpus": 0.05, "replicas": 2, "resources": {"fake_gpu": 0.5}, "max_batch_size": 4},
                "tiny_detector": {"num_cpus": 0.05, "max_batch_size": 2},
            }, **extra}


def _answers(url: str, image: bytes) -> bool:
    if httpx.get(f"{url}/readyz", timeout=30).status_code != 200:   # 404 until the application exists
        return False
    with VfmClient(url, timeout=30) as client:
        return len(client.predict("tiny_cnn", image, top_k=2)["predictions"]) == 2 and \
            "detections" in client.predict("tiny_detector", image)


def test_vfm_serve_spreads_replicas_over_two_nodes_and_survives_losing_one(cluster: Cluster, tmp_path: Path,
                                                                          small_png: bytes) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(_config(cluster.http_port)))
    url = f"http://127.0.0.1:{cluster.http_port}"
    log = (tmp_path / "serve.log").open("w+")
    serve = subprocess.Popen([sys.executable, "-m", "vfm", "serve", "--config", str(config),
                              "--address", cluster.address], env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        _wait("the service on the cluster", lambda: serve.poll() is None and _answers(url, small_png), timeout_s=150,
              every_s=2)
        print(f"service answering {time.monotonic() - started:.1f}s after `vfm serve --address` started")
        before = cluster.placement()
        head_id, worker_id = cluster.head.id_in(before), cluster.worker.id_in(before)
        where = {head_id: "head", worker_id: "worker"}
        print("replicas before:", sorted((r["deployment"], where[r["node"]]) for r in before["replicas"]))
        assert {r["node"] for r in before["replicas"]} == {head_id, worker_id}, before["replicas"]
        # the custom resource reached Ray: the two tiny_cnn replicas hold one of the two fake GPUs
        assert before["total"]["fake_gpu"] == 2 and before["available"]["fake_gpu"] == pytest.approx(1.0), before

        killed = time.monotonic()
        os.kill(cluster.worker.raylet_pid(), signal.SIGKILL)    # the worker node dies: no drain, no goodbye
        assert cluster.worker.proc.wait(timeout=60) != 0   # `ray start --block` sees its raylet die and stops

        def rescheduled() -> bool:
            now = cluster.placement()
            return (not now["nodes"][worker_id]["alive"] and len(now["replicas"]) == len(before["replicas"])
                    and all(r["node"] == head_id for r in now["replicas"]) and _answers(url, small_png))

        _wait("the service answering from the head alone", rescheduled, timeout_s=120, every_s=2)
        print(f"rescheduled and answering {time.monotonic() - killed:.1f}s after the worker node was killed")
        after = cluster.placement()
        assert sorted(r["deployment"] for r in after["replicas"]) == sorted(r["deployment"] for r in before["replicas"])
        assert after["available"].get("fake_gpu", 0.0) == pytest.approx(0.0)   # both tiny_cnn replicas on the head

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=90) == 0
        _wait("the application removed", lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 404,
              timeout_s=60, every_s=2)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=30)
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


def test_the_rendered_serve_config_builds_the_application_inside_the_cluster(cluster: Cluster, tmp_path: Path,
                                                                             small_png: bytes) -> None:
    """`vfm serve --render serve`, deployed as it is by Ray's own `serve run` (the path of `serve deploy`
    and of KubeRay's serveConfigV2): `vfm.service.app:build_app` builds the application from its args."""
    cfg = parse_config(_config(cluster.http_port), "the test config")
    rendered = tmp_path / "serve.yaml"
    rendered.write_text(render("serve", cfg, "cluster.yaml"))
    _run([str(BIN / "serve"), "run", "--non-blocking", f"--address={cluster.address}", str(rendered)], cluster.env)
    url = f"http://127.0.0.1:{cluster.http_port}"
    _wait("the application of the serve config", lambda: _answers(url, small_png), timeout_s=150, every_s=2)
    with VfmClient(url, timeout=30) as client:
        serving = client.model("tiny_cnn")["serving"]
        assert serving["max_batch_size"] == 4 and serving["replicas"] == 2 and serving["resources"] == {"fake_gpu": 0.5}
    placement = cluster.placement()
    assert sorted(r["deployment"] for r in placement["replicas"]) == [
        "ingress", "metrics", "model_tiny_cnn", "model_tiny_cnn", "model_tiny_detector"]

"""`vfm serve` in the foreground: it serves its config, answers `vfm predict --url`'s client,
and SIGTERM shuts Serve and the Ray it started down, cleanly (exit 0, no error or traceback),
leaving no process behind. `--access-log` turns on one log line per request, which is off by
default (the session's own Serve, started with the default, logs none)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from vfm.service.client import VfmClient, remote_predict

from conftest import descendants, free_port, wait_gone  # noqa: E402  (this folder's conftest)

CONFIG = """
host: 127.0.0.1
port: {port}
ingress: {{num_cpus: 0.05}}
models:
  tiny_cnn: {{num_cpus: 0.1, max_batch_size: 4}}
"""


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


def test_vfm_serve_runs_in_the_foreground_and_stops_clean_on_sigterm(tmp_path: Path, small_png: bytes) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(CONFIG.format(port=port))
    image = tmp_path / "image.png"
    image.write_bytes(small_png)
    ray_tmp = tempfile.mkdtemp(prefix="vfm-cli-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "vfm", "serve", "--config", str(config), "--access-log"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, timeout_s=150)
        answers = remote_predict(url, "tiny_cnn", [image, image], {"top_k": 2})
        assert len(answers) == 2 and answers[0] == answers[1] and len(answers[0]["predictions"]) == 2
        started = descendants(proc.pid)
        assert len(started) >= 3, started   # gcs, raylet, workers...

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        left = wait_gone(started, 30)
        assert not left, f"processes of vfm serve still alive: {left}"
        log.seek(0)
        output = log.read()
        assert f"at {url}" in output and "shutting down" in output and "vfm: stopped in" in output
        # --access-log: the ingress logged each request it answered (Ray sends the replicas' logs to the driver).
        assert any("ServeReplica:vfm:ingress" in line and "POST /v1/models/{name:path}/predict 200" in line
                   for line in output.splitlines()), output[-3000:]
        # A clean stop: Serve's controller is not killed mid-call, nothing failed, no traceback.
        stopping = output[output.index("shutting down"):]
        assert "failed" not in stopping and "Traceback" not in output and "ERROR" not in stopping, stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_vfm_predict_url_equals_local(service_url, chelsea_jpeg, tmp_path, capsys):
    """`vfm predict --url` calls the running server and answers as the local run does."""
    import json

    from vfm.cli import main

    path = tmp_path / "chelsea.jpg"
    path.write_bytes(chelsea_jpeg)
    assert main(["predict", "efficientnet_lite0", str(path), "--top-k", "3", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert main(["predict", "--url", service_url, "efficientnet_lite0", str(path), "--top-k", "3", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["label"] for p in remote] == [p["label"] for p in local]
    assert all(abs(a["score"] - b["score"]) < 1e-3 for a, b in zip(remote, local))
    assert main(["predict", "--url", service_url, "no_such_model", str(path)]) == 1
    assert "no_such_model" in capsys.readouterr().err


def _serve_logs(prefix: str) -> list[Path]:
    from hardening_tools import ray_logs_dir

    return sorted((ray_logs_dir() / "serve").glob(f"{prefix}*.log"))


def test_the_session_logs_no_access_line_by_default(client: VfmClient) -> None:
    """The session's Serve runs with the config's default (access_log: false): a request leaves a line in Serve's
    proxy log (requests are logged somewhere, with their id), and none in the ingress replica's log."""
    probe = f"access-log-probe-{os.getpid()}-{time.monotonic_ns()}"
    assert client.http.get("/v1/models", headers={"X-Request-ID": probe}).status_code == 200
    deadline = time.monotonic() + 15
    while not any(probe in path.read_text(errors="replace") for path in _serve_logs("proxy_")):
        assert time.monotonic() < deadline, "the proxy never logged the probe request"
        time.sleep(0.5)
    replica_logs = _serve_logs("replica_vfm_ingress")
    assert replica_logs, "no log file of the ingress replica"
    # Other lines may carry the probe's id (Serve tags every log record made while the request runs, a background
    # flush started meanwhile included); an access line is the one naming the route and its status.
    lines = [line for path in replica_logs for line in path.read_text(errors="replace").splitlines() if probe in line]
    assert not [line for line in lines if re.search(r"\bGET /v1/models\b.*\b200\b", line)], lines

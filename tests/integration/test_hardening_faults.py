"""Faults: a model replica killed by its PID under load (the service keeps answering, Serve restarts it,
/readyz shows it, and at most the requests in flight fail); an input that makes a model raise fails that
request alone, with its request id in the answer and the log; a killed write leaves the previous file."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from vfm.service.client import VfmClient

from hardening_tools import PNG_HEADERS, encoded, log_lines_with, noise, replica_pids
from test_errors import assert_error

VICTIM = "hardening/victim"
DETECTOR = "hardening/batched_detector"
SERVICE_MODELS = {
    # Killed by the test; Serve checks its health every second.
    VICTIM: {"model": "tiny_cnn", "num_cpus": 0.05, "max_batch_size": 4, "health_check_period_s": 1},
    # Waits 1 s to fill batches of 4, so four requests sent together share one runner call.
    DETECTOR: {"model": "tiny_detector", "num_cpus": 0.05, "max_batch_size": 4, "batch_wait_timeout_s": 1.0},
}
WORKERS = 4                    # load threads: at most this many requests are in flight at the kill
MAX_REQUESTS = 2000            # the load loop's bounds
MAX_SECONDS = 120


def _victim_state(client: VfmClient) -> dict:
    return client.http.get("/readyz", timeout=30).json()["models"][VICTIM]


@pytest.mark.timeout(300)
def test_a_replica_killed_under_load_is_replaced_and_only_requests_in_flight_may_fail(
        client: VfmClient, service_url: str, small_png: bytes) -> None:
    assert _victim_state(client) == {"status": "ready"}
    [pid] = replica_pids(VICTIM)
    outcomes: list[httpx.Response] = []
    stop = threading.Event()
    lock = threading.Lock()
    started = time.monotonic()

    def load() -> None:
        with httpx.Client(base_url=service_url, timeout=90) as http:
            while not stop.is_set() and len(outcomes) < MAX_REQUESTS and time.monotonic() - started < MAX_SECONDS:
                response = http.post(f"/v1/models/{VICTIM}/predict", content=small_png, headers=PNG_HEADERS)
                with lock:
                    outcomes.append(response)

    def wait_for(predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
            time.sleep(0.2)

    with ThreadPoolExecutor(WORKERS) as pool:
        workers = [pool.submit(load) for _ in range(WORKERS)]
        try:
            wait_for(lambda: len(outcomes) >= 40, 60, "40 answers before the kill")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: _victim_state(client)["status"] == "not_ready", 30, "/readyz shows the dead replica")
            reason = _victim_state(client).get("reason", "")
            wait_for(lambda: _victim_state(client) == {"status": "ready"}, 120, "/readyz shows it ready again")
            answered = len(outcomes)
            wait_for(lambda: len(outcomes) >= answered + 40, 60, "40 answers from the new replica")
        finally:
            stop.set()
            for w in workers:
                w.result(timeout=120)
    new = replica_pids(VICTIM)
    assert len(new) == 1 and new != [pid]
    failed = [r for r in outcomes if r.status_code != 200]
    for r in failed:  # a request whose replica died: 503 + Retry-After, never a 500
        assert_error(r, 503, "model_unavailable")
        assert r.headers["Retry-After"]
    assert len(failed) <= WORKERS, f"{len(failed)} of {len(outcomes)} failed; {WORKERS} were in flight"
    print(f"\nreplica kill: {len(outcomes)} requests, {len(failed)} failed, readyz said: {reason}")


async def _together(url: str, bodies: list[tuple[bytes, str]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        calls = [http.post(f"/v1/models/{DETECTOR}/predict", content=image, headers={**PNG_HEADERS,
                                                                                     "X-Request-ID": rid})
                 for image, rid in bodies]
        return await asyncio.wait_for(asyncio.gather(*calls), 60)


def test_an_input_that_makes_the_model_raise_fails_alone_not_its_batch_mates(client: VfmClient, service_url: str,
                                                                             metrics) -> None:
    labels = {"model": DETECTOR, "task": "detect"}
    before = metrics.read()
    goods = [encoded(noise(60, 90, seed), "PNG") for seed in range(3)]
    thin = encoded(noise(1, 2000, 7), "PNG")  # decodes, but the detector's resize makes it 0 x 320: it raises
    bad_id = f"hardening-{uuid.uuid4()}"
    rids = [f"hardening-good-{i}-{uuid.uuid4()}" for i in range(3)]
    answers = asyncio.run(_together(service_url, [(goods[0], rids[0]), (thin, bad_id), (goods[1], rids[1]),
                                                  (goods[2], rids[2])]))
    bad = answers[1]
    body = assert_error(bad, 422, "unprocessable_image", DETECTOR)
    assert bad.headers["X-Request-ID"] == bad_id and bad_id in body["error"]["message"]
    for response, rid in zip([answers[0], answers[2], answers[3]], rids):
        assert response.status_code == 200, response.text
        assert "detections" in response.json() and response.headers["X-Request-ID"] == rid

    # They did share a runner call: a batch of 3-4 images (then each image ran alone).
    def batches_of_3_or_4(samples) -> float:
        return (metrics.value(samples, "vfm_batch_size_bucket", le="4.0", **labels)
                - metrics.value(samples, "vfm_batch_size_bucket", le="2.0", **labels))

    after = metrics.read(until=lambda s: batches_of_3_or_4(s) > batches_of_3_or_4(before))
    assert batches_of_3_or_4(after) > batches_of_3_or_4(before), "the four requests never shared a batch"
    lines = log_lines_with(bad_id)
    assert any("raised on this input" in line for line in lines), lines
    assert not any(rid in line for rid in rids for line in log_lines_with("raised on this input", 0))
    assert client.predict(DETECTOR, goods[0])["detections"] is not None


# ---- atomic writes ----------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    kind, target = sys.argv[1], Path(sys.argv[2])
    if kind == "bytes":
        from vfm.models.checkpoints import atomic_write_bytes
        data = np.full(512 << 20, 7, np.uint8).tobytes()
        print("writing", flush=True)
        atomic_write_bytes(target, data)
    else:
        from vfm.models.heads import KNNHead, save_head
        features = np.ones((200_000, 256), np.float32)
        head = KNNHead(["new-a", "new-b"], features, np.arange(200_000) % 2, k=1)
        print("writing", flush=True)
        save_head(head, target, {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    print("done", flush=True)
""")


def _kill_mid_write(kind: str, target: Path, watch: Path) -> list[str]:
    """Run the writer; SIGKILL it once its temporary file appears in ``watch``. Returns the temporary files
    left behind: one when the kill landed mid-write (before the rename), none when it came after."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".tmp") for p in watch.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started its temp file"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return [p.name for p in watch.iterdir() if p.name.endswith(".tmp")]


def test_a_killed_atomic_write_leaves_the_previous_file(tmp_path: Path) -> None:
    from vfm.models.checkpoints import atomic_write_bytes

    previous = b"previous version " * 1000
    landed_mid_write = 0
    for attempt in range(3):
        folder = tmp_path / f"attempt{attempt}"
        target = folder / "weights.bin"
        atomic_write_bytes(target, previous)
        left = _kill_mid_write("bytes", target, folder)
        data = target.read_bytes()
        if left:  # killed before the rename: the old file, whole
            landed_mid_write += 1
            assert data == previous, "a killed write changed the file under its final name"
        else:
            assert data == b"\x07" * (512 << 20), "a partial file is visible under the final name"
        assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["weights.bin"]
    assert landed_mid_write >= 1, "no kill landed during the write"


def test_a_killed_head_save_leaves_the_previous_head_loadable(tmp_path: Path) -> None:
    from vfm.models.heads import KNNHead, load_head, save_head

    folder = tmp_path / "knn"
    save_head(KNNHead(["old-a", "old-b"], np.eye(2, 256, dtype=np.float32), np.arange(2), k=1), folder,
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    assert _kill_mid_write("head", folder, folder), "the kill did not land during the save"
    head, meta = load_head(folder)
    assert meta["labels"] == ["old-a", "old-b"] and head.train_features.shape == (2, 256)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["head.json",
                                                                                       "head.safetensors"]

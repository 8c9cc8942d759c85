"""Helpers of the test_hardening_* modules: crafted images, raw HTTP on a socket, and the processes of
the session's Serve replicas (found by the title Ray gives them: ``ray::ServeReplica:<app>:<deployment>``)."""
from __future__ import annotations

import io
import os
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conftest import descendants

PNG_HEADERS = {"Content-Type": "image/png"}


# ---- images ---------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A 69-byte PNG whose header declares ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


# ---- raw HTTP -------------------------------------------------------------------------------

@dataclass
class RawAnswer:
    status: int
    head: bytes
    body: bytes
    body_bytes_sent: int            # request body bytes the client got out before the answer came
    send_error: str | None = None   # how the rest of the body was refused (the server closed)


def _read_answer(sock: socket.socket) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    while match and len(body) < int(match.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, head, body


def raw_request(url: str, head: bytes, body_chunks: "list[bytes] | None" = None, pace_bytes_per_s: float = 0,
                timeout_s: float = 30.0) -> RawAnswer:
    """Send ``head`` (request line + headers) then, from a thread, ``body_chunks`` (paced when asked) while
    waiting for the answer; the sender stops as soon as the answer arrives."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sent = [0]
    errors: list[str] = []
    answered = threading.Event()

    def send_body() -> None:
        started = time.monotonic()
        try:
            for chunk in body_chunks or []:
                if answered.is_set():
                    return
                sock.sendall(chunk)
                sent[0] += len(chunk)
                if pace_bytes_per_s:
                    ahead = sent[0] / pace_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError as exc:  # the server answered and closed: the rest of the body is refused
            errors.append(type(exc).__name__)

    try:
        sock.sendall(head)
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        status, head_bytes, body = _read_answer(sock)
        answered.set()
        at_answer = sent[0]
    finally:
        answered.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    sender.join(timeout_s)
    return RawAnswer(status, head_bytes, body, at_answer, errors[0] if errors else None)


def chunked(total_bytes: int, chunk_bytes: int = 1 << 20) -> "list[bytes]":
    """A chunked-encoding body of ``total_bytes`` zeros (one shared chunk object: cheap to hold)."""
    one = b"%x\r\n" % chunk_bytes + b"\0" * chunk_bytes + b"\r\n"
    return [one] * (total_bytes // chunk_bytes) + [b"0\r\n\r\n"]


# ---- replica processes ----------------------------------------------------------------------

def deployment_title(served: str, app: str = "vfm") -> str:
    """The process title of a served model's replicas (service.app.deployment_name's rule)."""
    return f"ray::ServeReplica:{app}:model_" + re.sub(r"[^A-Za-z0-9_-]", "_", served)


def _is_actor(title: str, actor: str) -> bool:
    """Whether a process title is ``actor``'s: Ray titles an actor's process with its name while it is idle and with
    ``name.method`` while a call runs (a replica answering, or running its health check), so both count."""
    return title == actor or title.startswith(actor + ".")


def replica_pids(served: str) -> list[int]:
    """The live replica processes of a served model, among this test session's processes."""
    title = deployment_title(served)
    return [pid for pid in descendants(os.getpid()) if _is_actor(_title(pid), title)]


def ingress_pid() -> int:
    pids = [pid for pid in descendants(os.getpid()) if _is_actor(_title(pid), "ray::ServeReplica:vfm:ingress")]
    assert len(pids) == 1, pids
    return pids[0]


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def memory_kb(pid: int, field_name: str = "VmRSS") -> int:
    """A /proc/<pid>/status memory figure (VmRSS: resident now; VmHWM: the peak so far), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def ray_logs_dir() -> Path:
    """The log folder of the Ray this session started (replicas' stderr lands in worker-*.err)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def log_lines_with(text: str, timeout_s: float = 15.0) -> list[str]:
    """Lines of the Ray logs that contain ``text``; waits (bounded) for the workers' output to be flushed."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for path in ray_logs_dir().rglob("*"):
            if path.is_file() and path.suffix in (".err", ".out", ".log"):
                try:
                    content = path.read_text(errors="replace")
                except OSError:
                    continue
                found += [line for line in content.splitlines() if text in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)

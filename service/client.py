"""A small client of the vfm HTTP API (httpx), sync and async, for scripts, tests and benchmarks.

    >>> with VfmClient("http://127.0.0.1:8000") as vfm:
    ...     vfm.predict("efficientnet_lite0", "cat.jpg", top_k=3)["predictions"][0]["label"]
    'tiger cat'

Images may be bytes, a path, a PIL image or an HxWx3 uint8 array; ``transport`` picks how they
travel (``multipart``, ``json`` or ``raw``). A non-2xx answer raises ``VfmError`` carrying the
server's error ``type`` and ``message``.
"""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import httpx

Transport = Literal["multipart", "json", "raw"]
ImageLike = Any  # bytes | str | Path | PIL.Image.Image | np.ndarray


class VfmError(RuntimeError):
    """An error answer: ``status``, and the ``type``/``message`` of its body."""

    def __init__(self, status: int, type: str, message: str):
        super().__init__(f"HTTP {status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message


def image_bytes(image: ImageLike) -> bytes:
    """Encoded image bytes from bytes, a path, a PIL image or an array (arrays and PIL images become PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def request_parts(image: ImageLike | None, options: dict[str, Any], transport: Transport = "multipart"
                  ) -> dict[str, Any]:
    """``httpx`` keyword arguments that send ``image`` and ``options`` with ``transport``."""
    options = {k: v for k, v in options.items() if v is not None}
    data = image_bytes(image) if image is not None else None
    if transport == "json":
        body = dict(options)
        if data is not None:
            body["image"] = base64.b64encode(data).decode("ascii")
        return {"json": body}
    if transport == "multipart":
        if data is None:
            return {"json": options}  # no file to upload: JSON carries the options
        return {"files": {"image": ("image", data, _sniff(data))},
                "data": {k: _text(v) for k, v in options.items()}}
    if transport == "raw":
        params = {k: _text(v) for k, v in options.items()}
        if data is None:
            return {"params": params}
        return {"content": data, "params": params, "headers": {"Content-Type": _sniff(data)}}
    raise ValueError(f"Unknown transport {transport!r}; use multipart, json or raw.")


def _sniff(data: bytes) -> str:
    signatures = {b"\x89PNG": "image/png", b"\xff\xd8": "image/jpeg", b"GIF8": "image/gif", b"BM": "image/bmp",
                  b"RIFF": "image/webp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}
    for magic, media in signatures.items():
        if data.startswith(magic):
            return media
    return "application/octet-stream"


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        err = response.json()["error"]
        raise VfmError(response.status_code, err["type"], err["message"])
    except (ValueError, KeyError, TypeError):
        raise VfmError(response.status_code, "http_error", response.text[:500]) from None


def _model_path(name: str, route: str) -> str:
    return f"/v1/models/{name}/{route}"


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, transport: Transport):
        self.url = url.rstrip("/")
        self.transport = transport
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout


class VfmClient(_Base):
    """Blocking client; one connection pool; use as a context manager or call ``close()``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: Transport = "multipart"):
        super().__init__(url, api_key, timeout, transport)
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def __enter__(self) -> "VfmClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, image: ImageLike | None = None, transport: Transport | None = None,
             **options: Any) -> httpx.Response:
        """The raw response (no status check): for callers that look at errors themselves."""
        kwargs = request_parts(image, options, transport or self.transport) if (image is not None or options) else {}
        return self.http.request(method, path, **kwargs)

    def call(self, method: str, path: str, image: ImageLike | None = None, transport: Transport | None = None,
             **options: Any) -> Any:
        return _check(self.send(method, path, image, transport, **options))

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/healthz")

    def ready(self) -> tuple[bool, dict[str, Any]]:
        response = self.http.get("/readyz")
        return response.status_code == 200, response.json()

    def models(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/models/{name}")

    def predict(self, name: str, image: ImageLike, **options: Any) -> dict[str, Any]:
        return self.call("POST", _model_path(name, "predict"), image, **options)

    def embed(self, name: str, image: ImageLike, **options: Any) -> dict[str, Any]:
        return self.call("POST", _model_path(name, "embed"), image, **options)

    def encode(self, name: str, image: ImageLike) -> dict[str, Any]:
        return self.call("POST", _model_path(name, "encode"), image)

    def segment(self, name: str, image: ImageLike | None = None, **options: Any) -> dict[str, Any]:
        return self.call("POST", _model_path(name, "segment"), image, **options)

    def detect_segment(self, name: str, image: ImageLike, detector: str, **options: Any) -> dict[str, Any]:
        """SAM ``name``'s masks for the boxes ``detector`` finds (``score_threshold``, ``format``, ...)."""
        return self.call("POST", _model_path(name, "detect-segment"), image, detector=detector, **options)

    def heads(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/heads")["heads"]

    def head_predict(self, name: str, image: ImageLike, **options: Any) -> dict[str, Any]:
        return self.call("POST", f"/v1/heads/{name}/predict", image, **options)

    def reload_heads(self) -> dict[str, Any]:
        return self.call("POST", "/v1/admin/heads/reload")

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        response.raise_for_status()
        return response.text


class AsyncVfmClient(_Base):
    """The same calls for asyncio (concurrent load in benchmarks and tests)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: Transport = "multipart", max_connections: int = 100):
        super().__init__(url, api_key, timeout, transport)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=self.headers, limits=limits)

    async def __aenter__(self) -> "AsyncVfmClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, image: ImageLike | None = None, transport: Transport | None = None,
                   **options: Any) -> httpx.Response:
        kwargs = request_parts(image, options, transport or self.transport) if (image is not None or options) else {}
        return await self.http.request(method, path, **kwargs)

    async def call(self, method: str, path: str, image: ImageLike | None = None,
                   transport: Transport | None = None, **options: Any) -> Any:
        return _check(await self.send(method, path, image, transport, **options))

    async def predict(self, name: str, image: ImageLike, **options: Any) -> dict[str, Any]:
        return await self.call("POST", _model_path(name, "predict"), image, **options)

    async def embed(self, name: str, image: ImageLike, **options: Any) -> dict[str, Any]:
        return await self.call("POST", _model_path(name, "embed"), image, **options)


ROUTE_OF_TASK = {None: "predict", "classify": "predict", "detect": "predict", "embed": "embed", "segment": "segment",
                 "detect-segment": "detect-segment"}
# Answers about one image (its bytes, its size, what the model made of it): the CLI reports that image and
# goes on with the others. Every other error (unknown model, bad options, auth, server down) stops the run.
IMAGE_ERROR_TYPES = frozenset({"empty", "corrupt", "too_large", "too_many_pixels", "not_an_image",
                               "unsupported_format", "unprocessable_image", "payload_too_large"})
MAX_RETRIES = 5          # 503 answers with Retry-After (overloaded, still loading) are retried this often
MAX_RETRY_WAIT_S = 10.0

Answer = tuple[str, "dict[str, Any] | None", "str | None"]  # (path, answer, or the one-line reason it has none)


def _call_with_retries(client: VfmClient, path: str, image: ImageLike, **options: Any) -> Any:
    """One call; a 503 that says when to come back (Retry-After) is tried again, at most ``MAX_RETRIES`` times."""
    import time

    for attempt in range(MAX_RETRIES + 1):
        response = client.send("POST", path, image, **options)
        retry_after = response.headers.get("retry-after")
        if response.status_code != 503 or retry_after is None or attempt == MAX_RETRIES:
            return _check(response)
        try:
            wait = float(retry_after)
        except ValueError:
            wait = 1.0
        time.sleep(min(max(wait, 0.1), MAX_RETRY_WAIT_S))
    raise AssertionError("unreachable")


class RemoteCalls:
    """What `vfm predict --url` and `vfm heads ... --url` do on a server: many images, concurrently,
    answered in input order. The dispatcher hands one to the models CLI (which never imports the service).

    ``predict`` and ``head_predict`` yield ``(path, answer, None)`` or ``(path, None, reason)`` for an image
    the server refused (``IMAGE_ERROR_TYPES``) or that cannot be read here; any other error raises ``VfmError``.
    The API key defaults to $VFM_API_KEY.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0):
        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("VFM_API_KEY")
        self.timeout = timeout

    def client(self) -> VfmClient:
        return VfmClient(self.url, api_key=self.api_key, timeout=self.timeout)

    def heads(self) -> list[dict[str, Any]]:
        with self.client() as client:
            return client.heads()

    def predict(self, name: str, paths: Sequence[str], options: dict[str, Any], task: str | None = None,
                concurrency: int = 4) -> Iterator[Answer]:
        if task not in ROUTE_OF_TASK:
            raise ValueError(f"Unknown task {task!r}; use one of {', '.join(t for t in ROUTE_OF_TASK if t)}.")
        try:
            yield from self._stream(_model_path(name, ROUTE_OF_TASK[task]), paths, options, concurrency)
        except VfmError as exc:
            if exc.status == 404 and exc.type == "unknown_model" and self._is_head(name):
                raise VfmError(404, "unknown_model", f"{name!r} is a head, not a model: use `vfm heads predict "
                                                     f"--url {self.url} {name} PATH...`") from None
            raise

    def head_predict(self, name: str, paths: Sequence[str], options: dict[str, Any], concurrency: int = 4
                     ) -> Iterator[Answer]:
        yield from self._stream(f"/v1/heads/{name}/predict", paths, options, concurrency)

    def _is_head(self, name: str) -> bool:
        try:
            return any(h.get("name") == name for h in self.heads())
        except (VfmError, httpx.HTTPError):
            return False

    def _stream(self, route: str, paths: Sequence[str], options: dict[str, Any], concurrency: int
                ) -> Iterator[Answer]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        def one(path: str) -> Answer:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                return path, None, f"cannot read {path}: {exc.strerror or exc}"
            try:
                return path, _call_with_retries(client, route, data, **options), None
            except VfmError as exc:
                if exc.type in IMAGE_ERROR_TYPES:
                    return path, None, f"{path}: {exc}"
                raise

        # A window of requests in flight (twice the concurrency), so a folder of thousands of images is
        # neither read into memory at once nor answered out of order.
        with self.client() as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
            pending: deque = deque()
            todo = iter(paths)
            try:
                for path in todo:
                    pending.append(pool.submit(one, path))
                    if len(pending) >= 2 * concurrency:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


def remote_predict(url: str, name: str, image_paths: Sequence[str | Path], options: dict[str, Any],
                   task: str | None = None, api_key: str | None = None) -> list[dict[str, Any]]:
    """Run ``task`` (default: the model's predict route) on each image on a running server; one answer per
    path, in order. The API key defaults to $VFM_API_KEY. An image the server refuses raises ``VfmError``."""
    if task not in ROUTE_OF_TASK:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(t for t in ROUTE_OF_TASK if t)}.")
    api_key = api_key if api_key is not None else os.environ.get("VFM_API_KEY")
    with VfmClient(url, api_key=api_key) as client:
        return [client.call("POST", _model_path(name, ROUTE_OF_TASK[task]), Path(p), **options) for p in image_paths]

"""The three ways an image reaches the API, and where options come from.

- ``multipart/form-data``: the file field ``image``; other form fields are options.
- ``application/json``: ``{"image": "<base64>", ...options}`` (a ``data:image/...;base64,`` URL works too).
- ``image/*`` (or ``application/octet-stream``): the body is the image; options are query parameters.

Routes that take several images at once (``Route.batch``) also read ``images``: a JSON list of base64
strings, or repeated multipart file fields ``images``; ``image`` and ``images`` together are a 400.

Query parameters are options for every transport; body fields win when both give one. The
body is read with a byte cap, so an oversized upload is refused (413) before it is buffered.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .config import Limits
from .errors import bad_request, payload_too_large, unsupported_media_type
from .options import coerce_text

RAW_TYPES = ("application/octet-stream",)
HOW_TO_SEND = ("send it as the multipart file field `image`, as JSON {\"image\": \"<base64>\"}, or as the raw body "
               "with Content-Type image/*")


@dataclass
class ImageRequest:
    image: bytes | None
    options: dict[str, Any] = field(default_factory=dict)
    transport: str = "none"          # multipart | json | raw | none
    images: list[bytes] | None = None   # the `images` list of a batch request (then `image` is None)


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise payload_too_large(f"The request body is {declared} bytes; the limit is {max_bytes}.")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise payload_too_large(f"The request body is over the limit of {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _b64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise bad_request(f"{where}: a data URL must be base64 (data:image/png;base64,...).")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: not valid base64; {HOW_TO_SEND}.") from None


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _multipart(request: Request, body: bytes, limits: Limits) -> ImageRequest:
    # One file more than a batch may hold, so a request over the limit gets our 413, not the parser's 400.
    parser = MultiPartParser(request.headers, _once(body), max_files=limits.max_images_per_request + 1,
                             max_fields=64, max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise bad_request(f"The multipart body could not be parsed: {exc.message}.") from None
    try:
        image: bytes | None = None
        images: list[bytes] | None = None
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key == "image":
                image = await value.read() if isinstance(value, UploadFile) else _b64(value, "image")
            elif key == "images":
                images = images or []
                images.append(await value.read() if isinstance(value, UploadFile)
                              else _b64(value, f"images[{len(images)}]"))
            elif isinstance(value, UploadFile):
                raise bad_request(f"Unexpected file field {key!r}: {HOW_TO_SEND}.")
            else:
                options[key] = coerce_text(value)
        return ImageRequest(image, options, "multipart", images)
    finally:
        await form.close()


def _json(body: bytes) -> ImageRequest:
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise bad_request(f"The body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise bad_request("The JSON body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise bad_request(f"The JSON body must be an object like {{\"image\": \"<base64>\"}}, not "
                          f"{type(data).__name__}.")
    raw = data.pop("image", None)
    if raw is not None and not isinstance(raw, str):
        raise bad_request(f"image: must be a base64 string, not {type(raw).__name__}.")
    images = None
    if "images" in data:
        listed = data.pop("images")
        if not isinstance(listed, list):
            raise bad_request(f"images: must be a list of base64 strings, not {type(listed).__name__}.")
        for i, item in enumerate(listed):
            if not isinstance(item, str):
                raise bad_request(f"images[{i}]: must be a base64 string, not {type(item).__name__}.")
        images = [_b64(item, f"images[{i}]") for i, item in enumerate(listed)]
    return ImageRequest(_b64(raw, "image") if raw is not None else None, data, "json", images)


def _check_images(parsed: ImageRequest, limits: Limits, images_allowed: bool) -> None:
    """The rules of the ``images`` list: only where a route takes it, not with ``image``, 1..limit images."""
    if parsed.images is None:
        return
    if not images_allowed:
        raise bad_request("This route takes one image, in the field `image`; only predict, embed and head predict "
                          "take an `images` list.")
    if parsed.image is not None:
        raise bad_request("Give `image` (one image) or `images` (a list), not both.")
    if not parsed.images:
        raise bad_request("images: the list is empty; send at least one image.", type="missing_image")
    if len(parsed.images) > limits.max_images_per_request:
        raise payload_too_large(f"images: {len(parsed.images)} images; this service takes at most "
                                f"{limits.max_images_per_request} per request (limits.max_images_per_request): "
                                "split them into several requests.", type="too_many_images")


async def parse_image_request(request: Request, limits: Limits, image_required: bool = True,
                              images_allowed: bool = False) -> ImageRequest:
    """Read the image (or, where ``images_allowed``, the ``images`` list) and the options of a request, whichever
    transport it uses."""
    query = {key: coerce_text(value) for key, value in request.query_params.items()}
    media = _media_type(request)
    body = await read_body(request, limits.max_body_bytes)
    if media == "multipart/form-data":
        parsed = await _multipart(request, body, limits)
    elif media == "application/json" or media.endswith("+json"):
        parsed = _json(body)
    elif media.startswith("image/") or media in RAW_TYPES:
        parsed = ImageRequest(body or None, {}, "raw")
    elif not body:
        parsed = ImageRequest(None, {}, "none")
    else:
        raise unsupported_media_type(f"Content-Type {media or '(none)'} is not an image: {HOW_TO_SEND}.")
    parsed.options = {**query, **parsed.options}
    if "images" in parsed.options:  # a query parameter or a form text field: images are files or a JSON list
        raise bad_request("images: not a query parameter; send the list as JSON {\"images\": [\"<base64>\", ...]} or "
                          "as repeated multipart file fields `images`.")
    _check_images(parsed, limits, images_allowed)
    if image_required and not parsed.image and not parsed.images:
        raise bad_request(f"The request has no image: {HOW_TO_SEND}.", type="missing_image")
    return parsed

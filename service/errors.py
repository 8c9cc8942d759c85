"""Errors the service answers with: ``{"error": {"type", "message"}}`` and the right status.

Inside the ingress an ``ApiError`` is raised and turned into a JSON response by one handler.
Model replicas do not raise across Ray for expected problems (bad image bytes, bad options,
an evicted SAM embedding): they return a ``Failure`` value, which pickles plainly and keeps
tracebacks out of the logs; the ingress re-raises it as an ``ApiError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse


@dataclass
class Failure:
    """An expected failure computed in a replica, sent back as a value."""

    status: int
    type: str
    message: str


class ApiError(Exception):
    """An HTTP error answer. ``type`` is stable and machine-readable; ``message`` says what to do."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_failure(cls, failure: Failure) -> "ApiError":
        return cls(failure.status, failure.type, failure.message)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.type, self.message, self.headers)


def error_body(type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type, "message": message}}


def error_response(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type, message), status_code=status, headers=headers or None)


# ---- the errors the API raises, by name (one place for types and statuses) ---------------

def bad_request(message: str, type: str = "bad_request") -> ApiError:
    return ApiError(400, type, message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def not_found(type: str, message: str) -> ApiError:
    return ApiError(404, type, message)


def payload_too_large(message: str, type: str = "payload_too_large") -> ApiError:
    return ApiError(413, type, message)


def unsupported_media_type(message: str, type: str = "unsupported_media_type") -> ApiError:
    return ApiError(415, type, message)


def invalid_options(message: str) -> ApiError:
    return ApiError(422, "invalid_options", message)


def unavailable(type: str, message: str, retry_after_s: int | None) -> ApiError:
    """A 503. ``retry_after_s`` is None when retrying cannot help (a model that can never load here without an
    operator's action): no Retry-After then, so a client that obeys the header does not loop forever."""
    return ApiError(503, type, message, None if retry_after_s is None else {"Retry-After": str(retry_after_s)})


def timed_out(message: str) -> ApiError:
    return ApiError(504, "timeout", message)


@dataclass
class ErrorDoc:
    """One row of the error table shown in the OpenAPI description."""

    status: int
    types: list[str] = field(default_factory=list)
    meaning: str = ""


ERROR_TABLE = [
    ErrorDoc(400, ["bad_request", "empty", "corrupt", "unsupported_task"], "bad input: no image, a broken image, "
             "a task the model does not have"),
    ErrorDoc(401, ["unauthorized"], "a route that needs the API key was called without it"),
    ErrorDoc(404, ["not_found", "unknown_model", "unknown_head", "unknown_image_id"], "no such model, head, route "
             "or cached SAM embedding"),
    ErrorDoc(405, ["method_not_allowed"], "the route exists with another method"),
    ErrorDoc(413, ["payload_too_large", "too_large", "too_many_pixels", "too_many_images"], "body bytes, image "
             "pixels or the images of one request over the limit"),
    ErrorDoc(415, ["unsupported_media_type", "not_an_image", "unsupported_format"], "the body is not an image"),
    ErrorDoc(422, ["invalid_options", "unprocessable_image"], "an option is missing, of the wrong type or out of "
             "range, or the model cannot process this image"),
    ErrorDoc(503, ["overloaded", "model_unavailable", "not_ready"], "with Retry-After: overloaded, loading or "
             "restarting, try again after that many seconds; without it: the model cannot load here (missing "
             "weights, a refused checkpoint) until an operator acts, as the message says, so retrying does not help"),
    ErrorDoc(504, ["timeout"], "the model did not answer within the request timeout"),
]

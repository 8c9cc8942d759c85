"""HTTP API v1: every route comes from the ``ROUTES`` table; one wrapper gives each the same
auth, error mapping, metrics and OpenAPI documentation (``/docs``, ``/openapi.json``).

Model names may hold ``/`` (``google/vit-base-patch16-224``), so model routes use a path
converter. Every error is ``{"error": {"type", "message"}}``; an unexpected exception is a 500
with the same body and no traceback (and a bug to fix).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import ERROR_TABLE, ApiError, error_body, error_response
from .options import ClassifyOptions, DetectOptions, EmbedOptions, HeadPredictOptions, SegmentOptions

if TYPE_CHECKING:
    from .ingress import Ingress

log = logging.getLogger(__name__)

NAME_DOC = "served model name (may contain '/')"


@dataclass(frozen=True)
class Route:
    name: str                                   # metrics label and handler name on Ingress
    method: str
    path: str
    summary: str
    handler: str
    tag: str
    options: tuple[type[BaseModel], ...] = ()
    image: str | None = None                    # "required" | "optional" | None
    auth: str | None = "api"                    # "admin" | "api" (when api_key_scope: all) | None
    example_request: dict[str, Any] | None = None
    example_response: dict[str, Any] | None = None


_B64 = "<base64 image bytes>"
ROUTES: tuple[Route, ...] = (
    Route("healthz", "GET", "/healthz", "Liveness: 200 while the process lives", "healthz", "health", auth=None,
          example_response={"status": "ok"}),
    Route("readyz", "GET", "/readyz", "Readiness: 200 when every configured model serves, else 503 with reasons",
          "readyz", "health", auth=None,
          example_response={"ready": False, "models": {"efficientnet_lite0": {"status": "ready"}, "sam_vit_b": {
              "status": "unavailable", "reason": "Weights for model 'sam_vit_b' are not on this machine ..."}}}),
    Route("metrics", "GET", "/metrics", "Prometheus metrics (text format)", "metrics_text", "health", auth=None),
    Route("models", "GET", "/v1/models", "Every configured model, with status", "list_models", "models",
          example_response={"models": [{"name": "efficientnet_lite0", "task": "classify", "status": "ready",
                                        "backend": "torch", "device": "cpu", "input_size": 224}]}),
    Route("model", "GET", "/v1/models/{name:path}", "One model: task, backend, device, labels, input size, weights",
          "get_model", "models"),
    Route("predict", "POST", "/v1/models/{name:path}/predict", "Classify (top_k) or detect (thresholds) an image",
          "predict", "inference", (ClassifyOptions, DetectOptions), "required",
          example_request={"image": _B64, "top_k": 3},
          example_response={"model": "efficientnet_lite0", "predictions": [
              {"index": 282, "label": "tiger cat", "score": 0.38}]}),
    Route("embed", "POST", "/v1/models/{name:path}/embed", "Feature vector of a backbone", "embed", "inference",
          (EmbedOptions,), "required", example_request={"image": _B64, "normalize": True},
          example_response={"model": "efficientnet_lite0", "normalized": True, "dim": 1280,
                            "embedding": [0.01, -0.02]}),
    Route("encode", "POST", "/v1/models/{name:path}/encode", "SAM: compute and cache the image embedding",
          "encode", "segmentation", (), "required", example_request={"image": _B64},
          example_response={"model": "sam_vit_b", "image_id": "9f86d0...", "cached": False,
                            "image_size": {"height": 300, "width": 451}}),
    Route("segment", "POST", "/v1/models/{name:path}/segment",
          "SAM: masks for point/box prompts, on an image or a cached image_id", "segment", "segmentation",
          (SegmentOptions,), "optional",
          example_request={"image_id": "9f86d0...", "points": [[220, 140]], "point_labels": [1], "format": "rle"},
          example_response={"model": "sam_vit_b", "image_id": "9f86d0...", "cached": True, "format": "rle",
                            "image_size": {"height": 300, "width": 451}, "masks": [
                                {"score": 0.97, "area": 5120, "bbox": [180, 90, 260, 200],
                                 "rle": {"size": [300, 451], "counts": "..."}}]}),
    Route("heads", "GET", "/v1/heads", "Fine-tuned heads and their backbones", "list_heads", "heads",
          example_response={"heads": []}),
    Route("head_predict", "POST", "/v1/heads/{name:path}/predict", "Classify with a fine-tuned head",
          "head_predict", "heads", (HeadPredictOptions,), "required", example_request={"image": _B64, "top_k": 3}),
    Route("heads_reload", "POST", "/v1/admin/heads/reload", "Rescan the heads folder (needs the API key when set)",
          "reload_heads", "heads", auth="admin", example_response={"loaded": 0, "invalid": 0, "heads": []}),
)


# ---- OpenAPI ------------------------------------------------------------------------------

_REF = "#/components/schemas/{model}"


def _option_schemas(models: tuple[type[BaseModel], ...], components: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.get("$defs", {}))
        props.update(schema.get("properties", {}))
    return props


def _openapi_extra(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    props = _option_schemas(route.options, components)
    if route.options:
        extra["parameters"] = [{"name": k, "in": "query", "required": False, "description": v.get("description", ""),
                                "schema": {"type": "string"} if "$ref" in str(v) or v.get("type") == "array" else v}
                               for k, v in props.items()]
    if route.image:
        image_json = {"type": "string", "format": "byte", "description": "base64 image (or a data: URL)"}
        json_schema = {"type": "object", "properties": {"image": image_json, **props}}
        form_schema = {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            **{k: {"type": "string", "description": "JSON text, e.g. 5, true, [[10, 20]]"} for k in props}}}
        if route.image == "required":
            json_schema["required"] = form_schema["required"] = ["image"]
        content: dict[str, Any] = {"application/json": {"schema": json_schema},
                                   "multipart/form-data": {"schema": form_schema},
                                   "image/*": {"schema": {"type": "string", "format": "binary"}}}
        if route.example_request:
            content["application/json"]["example"] = route.example_request
        extra["requestBody"] = {"required": route.image == "required", "content": content}
    return extra


def _responses(route: Route) -> dict[int | str, Any]:
    responses: dict[int | str, Any] = {}
    if route.example_response is not None:
        responses[200] = {"description": "OK", "content": {"application/json": {"example": route.example_response}}}
    for row in ERROR_TABLE:
        if route.method == "GET" and row.status in (413, 415, 422, 504) and route.image is None:
            continue
        responses[row.status] = {"description": row.meaning, "content": {"application/json": {
            "example": error_body(row.types[0], "what went wrong and what to do")}}}
    return responses


def _description() -> str:
    rows = "\n".join(f"| {r.status} | {', '.join(r.types)} | {r.meaning} |" for r in ERROR_TABLE)
    return ("Vision foundation models over HTTP. Send an image as the multipart file field `image`, as JSON "
            "`{\"image\": \"<base64>\"}`, or as the raw body with `Content-Type: image/*`; options go in JSON "
            "fields, form fields or query parameters. Coordinates are pixels of the original image.\n\n"
            "Errors are `{\"error\": {\"type\", \"message\"}}`:\n\n| status | types | meaning |\n|---|---|---|\n"
            + rows)


# ---- the app ------------------------------------------------------------------------------

def _endpoint(service: "Ingress", route: Route) -> Callable:
    handler = getattr(service, route.handler)
    model_route = "{name" in route.path and route.tag != "heads"

    async def dispatch(request: Request, name: str | None) -> Response:
        started = time.perf_counter()
        label = (name if name in service.models else "unknown") if model_route else ""
        if model_route:
            service.metrics.inc("vfm_queue_depth", (label,), 1)
        try:
            service.authorize(request, route.auth)
            result = await (handler(request, name) if name is not None else handler(request))
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ApiError as exc:
            response = exc.response()
        except Exception:
            rid = request.headers.get("x-request-id", "-")
            log.exception("request %s: %s %s failed", rid, route.method, request.url.path)
            response = error_response(500, "internal", "The server failed on this request; this is a bug. "
                                      f"The log has the details under request id {rid}.")
        finally:
            if model_route:
                service.metrics.inc("vfm_queue_depth", (label,), -1)
        service.metrics.inc("vfm_requests", (label, route.name, str(response.status_code)))
        service.metrics.observe("vfm_request_latency_seconds", (label, route.name), time.perf_counter() - started)
        return response

    if "{name" in route.path:
        async def endpoint(request: Request, name: str = PathParam(..., description=NAME_DOC)) -> Response:
            return await dispatch(request, name)
    else:
        async def endpoint(request: Request) -> Response:
            return await dispatch(request, None)
    endpoint.__name__ = route.name
    return endpoint


def build_app(service: "Ingress") -> FastAPI:
    app = FastAPI(title="vfm", version="1", description=_description())
    components: dict[str, Any] = {}
    # Longer paths first, so /v1/models/{name}/predict is not swallowed by GET /v1/models/{name:path}.
    for route in sorted(ROUTES, key=lambda r: -len(r.path)):
        app.add_api_route(route.path, _endpoint(service, route), methods=[route.method], summary=route.summary,
                          tags=[route.tag], name=route.name, openapi_extra=_openapi_extra(route, components),
                          responses=_responses(route), response_class=JSONResponse)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if service.cfg.cors_origins:  # off unless configured: browsers on other origins get no CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(service.cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        message = {404: f"No route {request.method} {request.url.path}; GET /docs lists the API.",
                   405: f"{request.url.path} does not take {request.method}; GET /docs lists the API."
                   }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, kind, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(422, "invalid_options", f"{'.'.join(map(str, first['loc']))}: {first['msg']}")

    return app

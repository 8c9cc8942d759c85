"""The FastAPI app of the HTTP API v1 (``build_http_app``): every route comes from the ``ROUTES``
table of ``routes.py``; one wrapper gives each the same auth, error mapping, metrics and OpenAPI
documentation (``/openapi.json``: each route's options, request body, 200 answer from
``responses.py`` and error answers).

``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript and CSS from this service, not from a
CDN: ``fastapi-offline`` ships the bundles, served under ``/docs/assets/``. Their URLs start with
the request's root path, so they also work behind a Serve ``route_prefix`` or a proxy's prefix.

Model names may hold ``/`` (``google/vit-base-patch16-224``), so model routes use a path
converter. Every error is ``{"error": {"type", "message"}}``; an unexpected exception is a 500
with the same body and no traceback (and a bug to fix).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Union

import orjson
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from .errors import ERROR_TABLE, ApiError, error_body
from . import oip
from .responses import ErrorAnswer, OipErrorAnswer, OipModelReady, OipReady, ReadyAnswer, batch_answer
from .routes import ROUTES, Route

if TYPE_CHECKING:
    from .config import ServiceConfig
    from .metrics import MetricsBuffer

log = logging.getLogger(__name__)

NAME_DOC = "served model name (may contain '/')"
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again; absent when trying again cannot "
                                              "help (a model that cannot load without an operator)",
                               "required": False, "schema": {"type": "integer", "minimum": 0}}}
DOCS_ASSETS = "/docs/assets"    # Swagger UI's and ReDoc's JavaScript, CSS and icon, from the fastapi-offline package
PLAYGROUND = Path(__file__).parent / "playground"   # the browser page at `/` (plain HTML/JS/CSS, no CDN)


class RouteService(Protocol):
    """What the app needs of the service behind it (the ingress): one method per ``Route.handler``, named there,
    taking ``(route, request)`` or ``(route, request, name)``."""

    cfg: ServiceConfig
    models: Mapping[str, Any]
    metrics: MetricsBuffer

    def authorize(self, request: Request, scope: str | None) -> None: ...


class FastJSONResponse(JSONResponse):
    """A JSON answer rendered by orjson: about 1/15 of ``json.dumps``' CPU on an embedding (1280 floats), and numpy
    values pass as they are. NaN (which strict JSON cannot hold) becomes null rather than a 500."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


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
    props = _option_schemas(route.option_models, components)
    if route.request_body is not None:   # a JSON body of its own (v2 infer): the options are its `parameters`
        body = _schema(route.request_body, components)
        body.setdefault("properties", {})["parameters"] = {
            "type": "object", "properties": props, "description": "options (as /v1's), and the protocol's own "
            "(binary_data_output)"}
        content = {"schema": body, **({"example": route.example_request} if route.example_request else {})}
        extra["requestBody"] = {"required": True, "content": {"application/json": content}}
        return extra
    if props:
        extra["parameters"] = [{"name": k, "in": "query", "required": False, "description": v.get("description", ""),
                                "schema": {"type": "string"} if "$ref" in str(v) or v.get("type") == "array" else v}
                               for k, v in props.items()]
    if route.image:
        image_json = {"type": "string", "format": "byte", "description": "base64 image (or a data: URL)"}
        image_file = {"type": "string", "format": "binary"}
        json_props: dict[str, Any] = {"image": image_json}
        form_props: dict[str, Any] = {"image": image_file}
        if route.batch:   # several images: answered with {"model", "results"}, one single-image answer each
            json_props["images"] = {"type": "array", "items": image_json, "minItems": 1,
                                    "description": "several images instead of `image`; the answer's `results` "
                                                   "holds the answer to each, in order"}
            form_props["images"] = {"type": "array", "items": image_file, "minItems": 1,
                                    "description": "several images instead of `image`: repeat the file field"}
        json_schema = {"type": "object", "properties": {**json_props, **props}}
        form_text = {"type": "string", "description": "JSON text, e.g. 5, true, [[10, 20]]"}
        form_schema = {"type": "object", "properties": {**form_props, **{k: form_text for k in props}}}
        if route.image == "required":
            for schema in (json_schema, form_schema):
                if route.batch:   # `image` or `images`, not both
                    schema["oneOf"] = [{"required": ["image"]}, {"required": ["images"]}]
                else:
                    schema["required"] = ["image"]
        content: dict[str, Any] = {"application/json": {"schema": json_schema},
                                   "multipart/form-data": {"schema": form_schema},
                                   "image/*": {"schema": {"type": "string", "format": "binary"}}}
        if route.example_request:
            content["application/json"]["example"] = route.example_request
        extra["requestBody"] = {"required": route.image == "required", "content": content}
    return extra


def _schema(answer: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a type of ``responses.py``: a $ref to a component (its parts become components too)."""
    schema = TypeAdapter(answer).json_schema(ref_template=_REF, mode="serialization")
    components.update(schema.pop("$defs", {}))
    if schema.get("type") == "object" and "title" in schema:
        components[schema["title"]] = schema
        return {"$ref": _REF.format(model=schema["title"])}
    return schema


def media_type(route: Route) -> str:
    """The media type of the route's 200 answer (JSON, but for /metrics)."""
    return getattr(route.response, "media_type", "application/json")


def answer_type(route: Route) -> Any:
    """The type of the route's 200 answer: its row's ``response``, or that or the batch answer for a batch route."""
    if not route.batch:
        return route.response
    title = "".join(part.title() for part in route.name.split("_")) + "BatchAnswer"
    return Union[route.response, batch_answer(title, route.response)]


def error_statuses(route: Route) -> set[int]:
    """The error statuses the route can answer (every one with the error body)."""
    statuses: set[int] = set()
    if route.auth is not None:
        statuses.add(401)
    if "{name" in route.path:  # no such model or head; a name holding '/' may also reach another route's path
        statuses |= {404, 405, 422}   # 422: FastAPI's check of the path parameter, answered with the error body
    if route.image is not None or route.request_body is not None:  # a request to read, a model to call
        statuses |= {400, 404, 413, 415, 422, 503, 504}
    return statuses


def _responses(route: Route, components: dict[str, Any]) -> dict[int | str, Any]:
    if route.response is None:
        raise ValueError(f"route {route.name} documents no answer: give its row a `response`")
    media = media_type(route)
    if media == "application/json":
        ok: dict[str, Any] = {"schema": _schema(answer_type(route), components)}
    else:
        ok = {"schema": {"type": "string", "description": (route.response.__doc__ or "").strip()}}
    if route.example_response is not None:
        ok["example"] = route.example_response
    responses: dict[int | str, Any] = {200: {"description": "OK", "content": {media: ok}}}
    if route.response in (ReadyAnswer, OipReady, OipModelReady):  # not ready: the same body, with the reasons
        responses[503] = {"description": "Not ready: some model does not serve" + (
                              "; `models` says why" if route.response is ReadyAnswer else ""),
                          "headers": RETRY_AFTER, "content": {"application/json": {"schema": ok["schema"]}}}
    error = _schema(OipErrorAnswer if route.oip else ErrorAnswer, components)
    for row in ERROR_TABLE:
        if row.status in error_statuses(route) and row.status not in responses:
            responses[row.status] = {"description": row.meaning, "content": {"application/json": {
                "schema": error, "example": {"error": "what went wrong and what to do"} if route.oip
                else error_body(row.types[0], "what went wrong and what to do")}}}
            if row.status == 503:
                responses[row.status]["headers"] = RETRY_AFTER
    return responses


def answer_schema(openapi: dict[str, Any], path: str, method: str, status: int,
                  media: str = "application/json") -> dict[str, Any] | None:
    """The schema an OpenAPI document gives the ``status`` answer of ``method path``, whole (its ``$ref``s resolve
    within it): what a client or a test validates an answer against. None when the answer is not documented."""
    response = openapi["paths"][path][method.lower()]["responses"].get(str(status))
    content = (response or {}).get("content", {}).get(media)
    if content is None:
        return None
    return {**content["schema"], "components": openapi.get("components", {})}


def _description() -> str:
    rows = "\n".join(f"| {r.status} | {', '.join(r.types)} | {r.meaning} |" for r in ERROR_TABLE)
    return ("Vision foundation models over HTTP. Send an image as the multipart file field `image`, as JSON "
            "`{\"image\": \"<base64>\"}`, or as the raw body with `Content-Type: image/*`; options go in JSON "
            "fields, form fields or query parameters. Coordinates are pixels of the original image.\n\n"
            "The Open Inference Protocol v2 (KServe v2, Triton's HTTP API: `tritonclient.http`) is served under "
            "/v2 on the same models, with the binary tensor data extension; its errors are `{\"error\": \"...\"}` "
            "with the statuses below.\n\n"
            "Errors of /v1 are `{\"error\": {\"type\", \"message\"}}`:\n\n| status | types | meaning |\n|---|---|---|\n"
            + rows)


# ---- the app ------------------------------------------------------------------------------

def _endpoint(service: RouteService, route: Route) -> Callable:
    handler = getattr(service, route.handler)
    model_route = route.per_model

    async def dispatch(request: Request, name: str | None) -> Response:
        started = time.perf_counter()
        label = (name if name in service.models else "unknown") if model_route else ""
        if model_route:
            service.metrics.inc("vfm_queue_depth", (label,), 1)
        try:
            service.authorize(request, route.auth)
            result = await (handler(route, request, name) if name is not None else handler(route, request))
            response = result if isinstance(result, Response) else FastJSONResponse(result)
        except ApiError as exc:
            response = oip.error_response(exc) if route.oip else exc.response()
        except Exception:
            rid = request.headers.get("x-request-id", "-")
            log.exception("request %s: %s %s failed", rid, route.method, request.url.path)
            failed = ApiError(500, "internal", "The server failed on this request; this is a bug. "
                              f"The log has the details under request id {rid}.")
            response = oip.error_response(failed) if route.oip else failed.response()
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


def _v2(request: Request) -> bool:
    return oip.is_v2_path(request.url.path, request.scope.get("root_path", ""))


def build_http_app(service: RouteService) -> FastAPI:
    """The FastAPI app that serves ``ROUTES`` from ``service`` (Serve's ingress deployment runs it)."""
    app = FastAPIOffline(title="vfm", version="1", description=_description(), static_url=DOCS_ASSETS,
                         swagger_ui_parameters={"validatorUrl": None})   # no badge fetched from swagger.io
    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return FileResponse(PLAYGROUND / "index.html")

    components: dict[str, Any] = {}
    # Longer paths first, so /v1/models/{name}/predict is not swallowed by GET /v1/models/{name:path}.
    for route in sorted(ROUTES, key=lambda r: -len(r.path)):
        response_class = FastJSONResponse if media_type(route) == "application/json" else PlainTextResponse
        app.add_api_route(route.path, _endpoint(service, route), methods=[route.method], summary=route.summary,
                          tags=[route.tag], name=route.name, openapi_extra=_openapi_extra(route, components),
                          responses=_responses(route, components), response_class=response_class)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, servers=app.servers or None)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(components)
            if "HTTPValidationError" not in str(schema["paths"]):  # FastAPI's 422 body, which the error body replaced
                schemas.pop("HTTPValidationError", None)
                schemas.pop("ValidationError", None)
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
        error = ApiError(exc.status_code, kind, message, getattr(exc, "headers", None))
        return oip.error_response(error) if _v2(request) else error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        error = ApiError(422, "invalid_options", f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
        return oip.error_response(error) if _v2(request) else error.response()

    return app

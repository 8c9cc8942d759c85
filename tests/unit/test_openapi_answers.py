"""The OpenAPI documents every answer, and /docs and /redoc work offline (no Ray: the real FastAPI app of a real
Ingress, driven in-process; tests/integration/test_openapi_live.py checks the same on the live service)."""
from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import numpy as np
import pytest

from vfm.service.api import answer_schema
from vfm.service.routes import ROUTES

from docs_pages import page_urls

JSON = "application/json"


def _entry(served: str, tasks: list[str], status: str = "ready", reason: str | None = None) -> Any:
    from vfm.models import get_spec
    from vfm.service.ingress import ModelEntry

    spec = get_spec(served).to_json() if served.startswith("tiny_") else {"tasks": tasks}
    runtime = {"backend": "torch", "device": "cpu", "weights_path": None}   # as if a replica had answered
    return ModelEntry(served=served, registry=served, status=status, reason=reason, spec=spec,
                      serving={"num_cpus": 0.5}, runtime=runtime if status == "ready" else {})


async def _answers(heads: Path, requests: list[tuple[str, str, dict[str, Any]]],
                   root_path: str = "") -> list[httpx.Response]:
    """The answers of the app of a real Ingress (no replica: only what is answered before a replica call)."""
    from vfm.service.api import build_http_app
    from vfm.service.config import ServiceConfig
    from vfm.service.ingress import Ingress

    models = {"tiny_cnn": _entry("tiny_cnn", ["classify", "embed"]), "tiny_sam": _entry("tiny_sam", ["segment"]),
              "gone": _entry("gone", ["classify"], "unavailable", "its weights are not here")}
    ingress = object.__new__(Ingress)
    await ingress.__init__(ServiceConfig(heads_dir=str(heads)), models, {}, None)  # type: ignore[misc]
    app = build_http_app(ingress)
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://vfm.test") as http:
        return [await http.request(method, root_path + path, **kwargs) for method, path, kwargs in requests]


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    [answer] = asyncio.run(_answers(tmp_path_factory.mktemp("heads"), [("GET", "/openapi.json", {})]))
    return answer.json()


def _openapi_path(route_path: str) -> str:
    return route_path.replace(":path}", "}")


def _validate(openapi: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    schema = answer_schema(openapi, _openapi_path(path), method, status)
    assert schema is not None, f"{method} {path}: no {status} answer documented"
    jsonschema.Draft202012Validator(schema).validate(body)


def test_every_route_documents_its_200_answer(openapi: dict[str, Any]) -> None:
    for route in ROUTES:
        operation = openapi["paths"][_openapi_path(route.path)][route.method.lower()]
        content = operation["responses"]["200"]["content"]
        if route.name == "metrics":   # the Prometheus text format, not JSON
            assert content == {"text/plain": {"schema": {"type": "string", "description": content["text/plain"]
                                                         ["schema"]["description"]}}}
            continue
        assert list(content) == [JSON], route.name
        schema = content[JSON]["schema"]
        refs = [schema["$ref"]] if "$ref" in schema else [s["$ref"] for s in schema["anyOf"]]
        for ref in refs:   # each a closed object with its fields
            component = openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]]
            assert component["type"] == "object" and component["properties"], (route.name, ref)
            assert component["additionalProperties"] is False, (route.name, ref)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]   # every 422 is the error body


def test_every_error_is_documented_with_the_error_body(openapi: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/ErrorAnswer"}
    v2_error = {"$ref": "#/components/schemas/OipErrorAnswer"}   # the Open Inference Protocol's {"error": "..."}
    readiness = {"/readyz", "/v2/health/ready", "/v2/models/{name}/ready"}   # 503: the 200 body, not ready
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status == "200":
                    continue
                if (path, status) in {(p, "503") for p in readiness}:
                    assert response["content"][JSON]["schema"] == operation["responses"]["200"]["content"][JSON][
                        "schema"], path
                    continue
                expected = v2_error if path.startswith("/v2") else error
                assert response["content"][JSON]["schema"] == expected, (method, path, status)
    readyz = openapi["paths"]["/readyz"]["get"]["responses"]
    assert readyz["503"]["content"][JSON]["schema"] == readyz["200"]["content"][JSON]["schema"]


def test_every_example_answer_matches_its_schema(openapi: dict[str, Any]) -> None:
    examples = [route for route in ROUTES if route.example_response is not None]
    assert len(examples) >= 10
    for route in examples:
        _validate(openapi, route.path, route.method, 200, route.example_response)


def test_the_batch_routes_take_image_or_images_and_answer_one_result_per_image(openapi: dict[str, Any]) -> None:
    b64 = base64.b64encode(b"\x89PNG").decode()
    batch = {route.name for route in ROUTES if route.batch}
    assert batch == {"predict", "embed", "head_predict"}
    for route in ROUTES:
        if route.image is None:
            continue
        body = openapi["paths"][_openapi_path(route.path)]["post"]["requestBody"]["content"]
        json_body = jsonschema.Draft202012Validator(body[JSON]["schema"])
        form_body = body["multipart/form-data"]["schema"]
        assert ("images" in form_body["properties"]) == (route.name in batch), route.name
        if route.name not in batch:
            assert "images" not in body[JSON]["schema"]["properties"], route.name
            continue
        assert json_body.is_valid({"image": b64}) and json_body.is_valid({"images": [b64, b64], "top_k": 2})
        assert not json_body.is_valid({"image": b64, "images": [b64]}), route.name   # one or the other
        assert not json_body.is_valid({"top_k": 2}) and not json_body.is_valid({"images": []}), route.name

    single = {"model": "tiny_cnn", "predictions": [{"index": 3, "label": "3", "score": 0.5}]}
    _validate(openapi, "/v1/models/{name}/predict", "POST", 200, {"model": "tiny_cnn", "results": [single, single]})
    with pytest.raises(jsonschema.ValidationError):  # a batch holds single answers, not anything
        _validate(openapi, "/v1/models/{name}/predict", "POST", 200, {"model": "tiny_cnn", "results": [{"x": 1}]})
    embedded = {"model": "tiny_cnn", "normalized": False, "embedding": [0.5], "dim": 1, "warnings": ["random"]}
    _validate(openapi, "/v1/models/{name}/embed", "POST", 200, {"model": "tiny_cnn", "results": [embedded]})


def test_the_schemas_hold_the_answers_exactly(openapi: dict[str, Any]) -> None:
    """Closed objects: a field the service writes without documenting it, a missing field, a null where the
    field is left out, or the wrong mask format's field is refused."""
    mask = {"score": 0.9, "area": 4, "bbox": [0, 0, 2, 2]}
    answer = {"model": "tiny_sam", "format": "png", "image_id": "0" * 64, "cached": False,
              "image_size": {"height": 2, "width": 2}, "masks": [{**mask, "png": "iVBORw0KGgo="}]}
    path = "/v1/models/{name}/segment"
    _validate(openapi, path, "POST", 200, answer)
    _validate(openapi, path, "POST", 200, {**answer, "format": "polygons", "masks": [{**mask, "polygons": [[0, 1]]}]})
    _validate(openapi, path, "POST", 200, {**{k: v for k, v in answer.items() if k != "masks"},
                                           "results": [{"masks": [{**mask, "rle": {"size": [2, 2], "counts": "04"}}]}]})
    for wrong in ({**answer, "extra": 1}, {k: v for k, v in answer.items() if k != "cached"},
                  {**answer, "warnings": None}, {**answer, "warnings": []}, {**answer, "image_id": "9f86d0..."},
                  {**answer, "masks": [{**mask, "png": "x", "rle": {"size": [2, 2], "counts": "04"}}]},
                  {**answer, "masks": [{**mask, "bbox": [0, 0, 2]}]}):
        with pytest.raises(jsonschema.ValidationError):
            _validate(openapi, path, "POST", 200, wrong)
    _validate(openapi, path, "POST", 200, {**answer, "warnings": ["random weights"]})
    ready = {"ready": False, "models": {"a": {"status": "not_ready", "reason": "loading"}}, "waiting_for": ["a"],
             "unavailable": {"b": "weights missing: run vfm models download b"}}
    _validate(openapi, "/readyz", "GET", 503, ready)
    with pytest.raises(jsonschema.ValidationError):
        _validate(openapi, "/readyz", "GET", 200, {**ready, "models": {"a": {"status": "sleeping"}}})


def test_the_ingress_answers_before_any_replica_call_match_the_schema(openapi: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    from vfm.models.heads import KNNHead, save_head

    save_head(KNNHead(["a", "b"], np.eye(2, dtype=np.float32), np.arange(2), k=1), tmp_path / "knn",
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "head.json").write_text("{not json")
    png = {"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}}
    requests = [   # (route, method, url, request): every route answered before a replica call, and errors
        ("healthz", "GET", "/healthz", {}), ("models", "GET", "/v1/models", {}),
        ("model", "GET", "/v1/models/tiny_cnn", {}), ("model", "GET", "/v1/models/gone", {}),
        ("heads", "GET", "/v1/heads", {}), ("heads_reload", "POST", "/v1/admin/heads/reload", {}),
        ("model", "GET", "/v1/models/nope", {}), ("predict", "POST", "/v1/models/nope/predict", png),
        ("predict", "POST", "/v1/models/tiny_cnn/predict?top_k=0", png),
        ("predict", "POST", "/v1/models/gone/predict", png),
        ("embed", "POST", "/v1/models/tiny_cnn/embed", {"content": b"text", "headers": {"Content-Type": "text/plain"}}),
        ("segment", "POST", "/v1/models/tiny_sam/segment", {"json": {"points": [[1, 2]], "point_labels": [1]}}),
        ("head_predict", "POST", "/v1/heads/nope/predict", png),
        ("head_predict", "POST", "/v1/heads/broken/predict", png),
        ("model", "GET", "/v1/models/tiny_cnn/predict", {}),   # a model named 'tiny_cnn/predict' (names hold '/')
    ]
    answers = asyncio.run(_answers(tmp_path, [(method, url, request) for _, method, url, request in requests]))
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 200, 200, 404, 404, 422, 503, 415, 400, 404,
                                                503, 404]
    routes = {route.name: route for route in ROUTES}
    for (name, method, _, _), answer in zip(requests, answers):
        _validate(openapi, routes[name].path, method, answer.status_code, answer.json())
    heads = {h["name"]: h for h in answers[4].json()["heads"]}
    assert heads["knn"]["status"] == "ready" and heads["broken"]["status"] == "invalid"   # both forms documented


@pytest.mark.parametrize("root_path", ["", "/vfm"])   # "/vfm": as behind Serve's route_prefix /vfm
def test_the_docs_pages_load_everything_from_the_service(tmp_path: Path, root_path: str) -> None:
    docs, redoc = asyncio.run(_answers(tmp_path, [("GET", "/docs", {}), ("GET", "/redoc", {})], root_path))
    assert docs.status_code == redoc.status_code == 200
    urls = {page: page_urls(answer.text) for page, answer in (("/docs", docs), ("/redoc", redoc))}
    assert len(urls["/docs"]) >= 4 and len(urls["/redoc"]) >= 3   # css, icon, js, openapi.json (+ redoc's)
    wanted = []
    for page, found in urls.items():
        for url in found:
            absolute = urljoin(f"http://vfm.test{root_path}{page}", url)
            parts = urlsplit(absolute)
            assert parts.netloc == "vfm.test", f"{page} loads {url} from another host"
            assert parts.path.startswith(f"{root_path}/"), f"{page} loads {url} from outside the prefix"
            wanted.append(parts.path[len(root_path):])
    assert any(path.endswith(".js") for path in wanted) and any(path.endswith(".css") for path in wanted)
    fetched = asyncio.run(_answers(tmp_path, [("GET", path, {}) for path in sorted(set(wanted))], root_path))
    for path, answer in zip(sorted(set(wanted)), fetched):
        assert answer.status_code == 200, path
        kind = {"js": "javascript", "css": "text/css", "png": "image/png", "json": JSON}[path.rsplit(".", 1)[-1]]
        assert kind in answer.headers["content-type"], (path, answer.headers["content-type"])
        assert len(answer.content) > 1000, path
    for text in (docs.text, redoc.text):
        assert not re.search(r"https?://", text), "a docs page names an outside URL"

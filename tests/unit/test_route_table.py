"""The route table: one row per route, and the ingress answering from it (no Ray: the checks that come
before a replica call, on the real FastAPI app of a real Ingress)."""
from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from vfm.service.options import ClassifyOptions, DetectOptions, EmbedOptions
from vfm.service.routes import ROUTES, Route

BY_NAME = {route.name: route for route in ROUTES}


def test_predict_parses_the_options_of_what_the_model_does() -> None:
    predict = BY_NAME["predict"]
    assert predict.tasks == ("classify", "detect")
    assert predict.options_for(["classify", "embed"]) is ClassifyOptions
    assert predict.options_for(["detect"]) is DetectOptions
    assert predict.option_models == (ClassifyOptions, DetectOptions)  # both documented in OpenAPI
    assert BY_NAME["embed"].options_for(["classify", "embed"]) is EmbedOptions
    with pytest.raises(ValueError, match="serves classify, detect, not segment"):
        predict.options_for(["segment"])


def test_per_task_options_must_name_the_routes_tasks() -> None:
    with pytest.raises(ValueError, match="must follow tasks"):
        Route("x", "POST", "/v1/models/{name:path}/x", "x", "inference", "infer", tasks=("classify",),
              options={"detect": DetectOptions})


def test_every_row_names_an_ingress_handler_that_takes_the_row() -> None:
    from vfm.service.deployments import ModelServer
    from vfm.service.ingress import Ingress

    assert len({route.name for route in ROUTES}) == len(ROUTES)
    for route in ROUTES:
        params = list(inspect.signature(getattr(Ingress, route.handler)).parameters)
        assert params[:3] == ["self", "route", "request"], route.name
        assert ("name" in params) == ("{name" in route.path), route.name
        if route.replica_method is not None:
            assert callable(getattr(ModelServer, route.replica_method)), route.name
        if route.tasks or route.image:
            assert route.options is not None, f"{route.name} parses a request, so it names its options"
    assert {r.name for r in ROUTES if r.handler == "infer"} == {"predict", "embed", "encode"}


def test_the_http_app_does_not_import_the_ingress() -> None:
    """api.py builds the app from the table and whatever serves its handlers; only the ingress knows both."""
    code = "import sys, vfm.service.api; print('vfm.service.ingress' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


# ---- the ingress answering from the table, before any replica is called ------------------------

def _entry(served: str, tasks: list[str], status: str = "ready", reason: str | None = None) -> Any:
    from vfm.service.ingress import ModelEntry

    return ModelEntry(served=served, registry=served, status=status, reason=reason, spec={"tasks": tasks},
                      serving={})


async def _answers(tmp_path: Path, requests: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    from vfm.service.api import build_http_app
    from vfm.service.config import ServiceConfig
    from vfm.service.ingress import Ingress

    models = {"classifier": _entry("classifier", ["classify", "embed"]), "detector": _entry("detector", ["detect"]),
              "sam": _entry("sam", ["segment"]),
              "gone": _entry("gone", ["classify"], "unavailable", "its weights are not here")}
    ingress = object.__new__(Ingress)
    await ingress.__init__(ServiceConfig(heads_dir=str(tmp_path)), models, {}, None)  # type: ignore[misc]
    app = build_http_app(ingress)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vfm") as http:
        return [await http.request(method, path, **kwargs) for method, path, kwargs in requests]


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["type"]


def test_model_routes_check_the_model_task_options_and_image_before_calling_a_replica(tmp_path: Path) -> None:
    png = {"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}}
    answers = asyncio.run(_answers(tmp_path, [
        ("POST", "/v1/models/nope/predict", png),
        ("POST", "/v1/models/detector/embed", png),
        ("POST", "/v1/models/detector/predict?top_k=3", png),         # a detector takes thresholds, not top_k
        ("POST", "/v1/models/classifier/predict?score_threshold=0.3", png),
        ("POST", "/v1/models/classifier/embed?normalise=true", png),
        ("POST", "/v1/models/sam/encode?top_k=1", png),                # encode takes no options
        ("POST", "/v1/models/classifier/predict", {}),                 # no image
        ("POST", "/v1/models/sam/segment", {"json": {"points": [[1, 2]], "point_labels": [1]}}),
        ("POST", "/v1/models/gone/predict", png),
    ]))
    assert [_error(a) for a in answers] == [
        (404, "unknown_model"), (400, "unsupported_task"), (422, "invalid_options"), (422, "invalid_options"),
        (422, "invalid_options"), (422, "invalid_options"), (400, "missing_image"), (400, "missing_image"),
        (503, "model_unavailable")]
    assert "has no embed route: it does detect" in answers[1].json()["error"]["message"]
    assert "top_k: unknown option" in answers[2].json()["error"]["message"]
    assert "did you mean normalize?" in answers[4].json()["error"]["message"]
    assert "segment needs the image" in answers[7].json()["error"]["message"]


def test_detect_segment_checks_the_sam_the_detector_and_the_options_before_calling_a_replica(tmp_path: Path) -> None:
    png = {"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}}
    answers = asyncio.run(_answers(tmp_path, [
        ("POST", "/v1/models/nope/detect-segment?detector=detector", png),
        ("POST", "/v1/models/detector/detect-segment?detector=detector", png),     # the path names the SAM
        ("POST", "/v1/models/sam/detect-segment", png),                            # no detector
        ("POST", "/v1/models/sam/detect-segment?detector=detector&max_detections=17", png),  # > max_prompts 16
        ("POST", "/v1/models/sam/detect-segment?detector=detector&box=[1,2,3,4]", png),
        ("POST", "/v1/models/sam/detect-segment?detector=nope", png),
        ("POST", "/v1/models/sam/detect-segment?detector=classifier", png),
        ("POST", "/v1/models/sam/detect-segment?detector=gone", png),
        ("POST", "/v1/models/sam/detect-segment", {"json": {"detector": "detector"}}),  # no image
    ]))
    assert [_error(a) for a in answers] == [
        (404, "unknown_model"), (400, "unsupported_task"), (422, "invalid_options"), (422, "invalid_options"),
        (422, "invalid_options"), (404, "unknown_model"), (400, "unsupported_task"), (503, "model_unavailable"),
        (400, "missing_image")]
    assert "detector: Field required" in answers[2].json()["error"]["message"]
    assert "limit of 16 prompts" in answers[3].json()["error"]["message"]
    assert "'classifier' is not a detector" in answers[6].json()["error"]["message"]

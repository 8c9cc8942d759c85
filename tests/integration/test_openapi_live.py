"""The live service's OpenAPI documents what it really answers: every kind of answer (each route, each task a
route serves, each mask format, segment's three forms, heads ready and invalid) matches the schema
/openapi.json gives its status; and /docs and /redoc load every asset from the service itself."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import numpy as np
import pytest

from vfm.service.api import answer_schema
from vfm.service.client import VfmClient

from docs_pages import page_urls


def test_docs_and_redoc_load_every_asset_from_the_service(service_url: str) -> None:
    host = urlsplit(service_url).netloc
    for page in ("/docs", "/redoc"):
        answer = httpx.get(service_url + page, timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        urls = page_urls(answer.text)
        assert any(u.endswith(".js") for u in urls) and any(u.endswith("openapi.json") for u in urls), urls
        for url in urls:
            absolute = urljoin(service_url + page, url)
            assert urlsplit(absolute).netloc == host, f"{page} loads {url} from another host"
            asset = httpx.get(absolute, timeout=30)
            assert asset.status_code == 200 and len(asset.content) > 1000, (page, url, asset.status_code)
        assert not re.search(r"https?://", answer.text), f"{page} names an outside URL"


@pytest.fixture
def openapi(service_url: str) -> dict[str, Any]:
    return httpx.get(f"{service_url}/openapi.json", timeout=30).json()


@pytest.fixture
def heads(heads_dir: Path, client: VfmClient, api_key: str, random_pngs: Any) -> Iterator[list[bytes]]:
    """A ready k-NN head over tiny_cnn ('knn') and a broken one, loaded; the folder emptied after the test."""
    from vfm.models.heads import KNNHead, save_head

    images = random_pngs(2, seed=5)
    features = np.asarray([client.embed("tiny_cnn", image)["embedding"] for image in images], np.float32)
    save_head(KNNHead(["first", "second"], features, np.arange(2), k=1), heads_dir / "knn",
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    (heads_dir / "broken").mkdir()
    (heads_dir / "broken" / "head.json").write_text("{not json")
    yield images
    for child in heads_dir.iterdir():
        shutil.rmtree(child)
    client.http.post("/v1/admin/heads/reload", headers={"Authorization": f"Bearer {api_key}"}).raise_for_status()


def test_every_kind_of_answer_matches_its_documented_schema(openapi: dict[str, Any], client: VfmClient,
                                                            api_key: str, heads: list[bytes], small_png: bytes,
                                                            astronaut_jpeg: bytes, chelsea_jpeg: bytes) -> None:
    admin = {"Authorization": f"Bearer {api_key}"}
    image_id = client.encode("tiny_sam", chelsea_jpeg)["image_id"]
    prompt = {"points": [[30, 20]], "point_labels": [1]}
    # tiny_sam's random decoder predicts IoUs near 0: keep every candidate so there are masks to check
    everything = {"mode": "everything", "points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}
    model, segment = "/v1/models/{name}", "/v1/models/{name}/segment"
    detect_segment = "/v1/models/{name}/detect-segment"
    calls: list[tuple[str, str, str, dict[str, Any]]] = [   # (documented path, method, URL, request)
        ("/healthz", "GET", "/healthz", {}),
        ("/readyz", "GET", "/readyz", {}),
        ("/v1/models", "GET", "/v1/models", {}),
        (model, "GET", "/v1/models/tiny_cnn", {}),
        (model, "GET", "/v1/models/sam_vit_b", {}),       # unavailable: with its reason
        (model, "GET", "/v1/models/test/slow_cnn", {}),
        ("/v1/models/{name}/predict", "POST", "/v1/models/tiny_cnn/predict", {"image": small_png, "top_k": 3}),
        ("/v1/models/{name}/predict", "POST", "/v1/models/tiny_detector/predict", {"image": small_png}),
        ("/v1/models/{name}/predict", "POST", "/v1/models/mtcnn_faces/predict", {"image": astronaut_jpeg}),
        ("/v1/models/{name}/embed", "POST", "/v1/models/tiny_vit/embed", {"image": small_png, "normalize": True}),
        ("/v1/models/{name}/encode", "POST", "/v1/models/tiny_sam/encode", {"image": small_png}),
        (segment, "POST", "/v1/models/tiny_sam/segment", {"image": small_png, **prompt}),
        (segment, "POST", "/v1/models/tiny_sam/segment", {"image_id": image_id, "format": "png", "multimask": True,
                                                          **prompt}),
        (segment, "POST", "/v1/models/tiny_sam/segment", {"image_id": image_id, "format": "polygons", "prompts": [
            prompt, {"box": [5, 5, 60, 40]}]}),
        *[(segment, "POST", "/v1/models/tiny_sam/segment", {"image_id": image_id, "format": fmt, **everything})
          for fmt in ("rle", "png", "polygons")],
        (detect_segment, "POST", "/v1/models/tiny_sam/detect-segment", {"image": astronaut_jpeg,
                                                                        "detector": "mtcnn_faces"}),
        (detect_segment, "POST", "/v1/models/tiny_sam/detect-segment", {"image": small_png, "format": "png",
                                                                        "detector": "tiny_detector",
                                                                        "score_threshold": 0}),
        ("/v1/admin/heads/reload", "POST", "/v1/admin/heads/reload", {"headers": admin}),
        ("/v1/heads", "GET", "/v1/heads", {}),
        ("/v1/heads/{name}/predict", "POST", "/v1/heads/knn/predict", {"image": heads[0], "top_k": 2}),
        # errors: each with the error body
        ("/v1/models/{name}/predict", "POST", "/v1/models/nope/predict", {"image": small_png}),
        ("/v1/models/{name}/encode", "POST", "/v1/models/sam_vit_b/encode", {"image": small_png}),
        ("/v1/heads/{name}/predict", "POST", "/v1/heads/broken/predict", {"image": small_png}),
        ("/v1/admin/heads/reload", "POST", "/v1/admin/heads/reload", {}),
        (segment, "POST", "/v1/models/tiny_sam/segment", {"image_id": "0" * 64, **prompt}),
    ]
    answers = []
    for path, method, url, request in calls:
        request = dict(request)
        headers = request.pop("headers", None)
        image = request.pop("image", None)
        if image is None and not request:
            answer = client.http.request(method, url, headers=headers)
        else:
            answer = client.send(method, url, image, "json", **request)
        schema = answer_schema(openapi, path, method, answer.status_code)
        assert schema is not None, f"{method} {url} answered {answer.status_code}, which is not documented"
        assert answer.headers["content-type"] == "application/json", (url, answer.headers["content-type"])
        jsonschema.Draft202012Validator(schema).validate(answer.json())
        answers.append((url, answer.status_code, answer.json()))

    statuses = [status for _, status, _ in answers]
    assert statuses[0] == 200 and statuses[1] in (200, 503) and set(statuses[2:-5]) == {200}, answers
    assert statuses[-5:] == [404, 503, 503, 401, 404], answers[-5:]
    by_url = {}
    for url, _, body in answers[:-5]:
        by_url.setdefault(url, []).append(body)
    assert by_url["/v1/models/mtcnn_faces/predict"][0]["detections"][0]["landmarks"]   # the optional field, there
    assert {h["status"] for h in by_url["/v1/heads"][0]["heads"]} == {"ready", "invalid"}
    single, multimask, prompts, *everything_forms = by_url["/v1/models/tiny_sam/segment"]
    assert "masks" in single and "results" not in single and "rle" in single["masks"][0]
    assert len(multimask["masks"]) == 3 and "png" in multimask["masks"][0]
    assert len(prompts["results"]) == 2 and "polygons" in prompts["results"][1]["masks"][0]
    for fmt, found in zip(("rle", "png", "polygons"), everything_forms, strict=True):
        assert found["mode"] == "everything" and found["masks"] and fmt in found["masks"][0], found

    metrics = client.http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain; version=")
    assert "text/plain" in openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]

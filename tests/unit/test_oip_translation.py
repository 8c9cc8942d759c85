"""The Open Inference Protocol v2 translation (service/oip.py): request tensors -> /v1's images and options, replica
answers -> output tensors, read back with Triton's own client code (tritonclient's InferResult and serializers)."""
from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest

from vfm.service import oip
from vfm.service.config import Limits
from vfm.service.errors import ApiError
from vfm.service.options import ClassifyOptions, EmbedOptions

LIMITS = Limits(max_pixels=10_000, max_images_per_request=4)


def _request(inputs: list[dict[str, Any]], binary: bytes = b"", **extra: Any) -> oip.Inputs:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return oip.parse_infer_request(header + binary, str(len(header)) if binary else None, LIMITS)


def _refused(status: int, match: str, inputs: list[dict[str, Any]], binary: bytes = b"", **extra: Any) -> None:
    with pytest.raises(ApiError, match=match) as err:
        _request(inputs, binary, **extra)
    assert err.value.status == status


def test_bytes_in_json_are_base64_and_in_binary_raw() -> None:
    files = [b"\xff\xd8 a jpeg", b"\x89PNG"]
    parsed = _request([{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(f).decode() for f in files]}], parameters={"top_k": 3})
    assert parsed.images == files and parsed.batched and parsed.options == {"top_k": 3}
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    parsed = _request([{"name": "image", "datatype": "BYTES", "shape": [2],
                        "parameters": {"binary_data_size": len(raw)}}],
                      raw, parameters={"binary_data_output": True, "top_k": 1})
    assert parsed.images == files and parsed.binary_output and parsed.options == {"top_k": 1}   # reserved: not options


def test_tritonclients_own_request_body_parses() -> None:
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http._utils import _get_inference_request

    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    tensor = InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)   # binary by default
    body, header = _get_inference_request([tensor], "req-1", [InferRequestedOutput("scores")], 0, False, False, 0,
                                          None, {"top_k": 2})
    parsed = oip.parse_infer_request(body, str(header), LIMITS)
    assert parsed.id == "req-1" and parsed.batched and parsed.options == {"top_k": 2}
    assert [o.name for o in parsed.outputs or []] == ["scores"]
    assert np.array_equal(np.stack(parsed.images), pixels)
    tensor = InferInput("pixels", [3, 4, 3], "UINT8")
    tensor.set_data_from_numpy(pixels[0], binary_data=False)   # JSON, one image [H,W,3]
    body, header = _get_inference_request([tensor], "", None, 0, False, False, 0, None, None)
    parsed = oip.parse_infer_request(body, header and str(header), LIMITS)
    assert not parsed.batched and len(parsed.images) == 1 and np.array_equal(parsed.images[0], pixels[0])
    assert parsed.binary_output   # no outputs named: tritonclient asks for binary outputs


@pytest.mark.parametrize(("status", "match", "inputs"), [
    (400, "one: `image`", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}] * 2),
    (400, "no such input", [{"name": "img", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]),
    (400, "`image` is BYTES", [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]),
    (400, "not one of the protocol", [{"name": "image", "datatype": "STRING", "shape": [1], "data": ["a"]}]),
    (400, "2 elements for shape", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA==", "AA=="]}]),
    (400, "base64", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]),
    (400, "base64 string", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [5]}]),
    (400, "negative", [{"name": "image", "datatype": "BYTES", "shape": [-1], "data": []}]),
    (400, r"\[H,W,3\]", [{"name": "pixels", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3, 4]}]),
    (400, "integers in", [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 256]}]),
    (400, "integers in", [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 0.5]}]),
    (400, "must be numbers", [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, "3"]}]),
    (413, "over the limit", [{"name": "pixels", "datatype": "UINT8", "shape": [101, 100, 3],
                              "data": [0] * (101 * 100 * 3)}]),
    (413, "at most 4", [{"name": "image", "datatype": "BYTES", "shape": [5], "data": ["AA=="] * 5}]),
    (400, "no `data`", [{"name": "image", "datatype": "BYTES", "shape": [1]}]),
    (400, "not the protocol's", [{"name": "image", "datatype": "BYTES"}]),
])
def test_bad_tensors_are_refused_with_a_clear_message(status: int, match: str, inputs: list[dict[str, Any]]) -> None:
    _refused(status, match, inputs)


def test_bad_bodies_and_binary_data_are_refused() -> None:
    with pytest.raises(ApiError, match="not valid JSON"):
        oip.parse_infer_request(b"{", None, LIMITS)
    with pytest.raises(ApiError, match="within the body"):
        oip.parse_infer_request(b"{}", "99", LIMITS)
    with pytest.raises(ApiError, match="not the protocol's"):
        oip.parse_infer_request(b'{"inputs": [], "extra": 1}', None, LIMITS)
    image = [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]
    _refused(400, "runs past", image, struct.pack("<I", 9) + b"abc")
    _refused(400, "binary_data_size 7 is not the 3", image, b"abc")
    pixels = [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 3], "parameters": {"binary_data_size": 5}}]
    _refused(400, "5 bytes of binary data", pixels, b"12345")
    _refused(400, "must be true or false", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
             parameters={"binary_data_output": "yes"})
    _refused(400, "must be true or false", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
             outputs=[{"name": "scores", "parameters": {"binary_data": 1}}])
    _refused(400, "no input names them", [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
             b"xx")


def test_the_outputs_asked_for_choose_the_tasks() -> None:
    tasks = ["classify", "embed"]
    assert oip.plan("m", tasks, None) == ["classify"]
    assert oip.plan("m", ["embed"], None) == ["embed"]
    asked = [oip.RequestedOutput(name=n) for n in ("embedding", "scores", "labels")]
    assert oip.plan("m", tasks, asked) == ["embed", "classify"]
    with pytest.raises(ApiError, match="no output 'boxes'; its outputs: labels, scores, indices, embedding"):
        oip.plan("m", tasks, [oip.RequestedOutput(name="boxes")])
    split = oip.split_options({"top_k": 2, "normalize": True, "typo": 1},
                              {"classify": ClassifyOptions, "embed": EmbedOptions})
    assert split == {"classify": {"top_k": 2, "typo": 1}, "embed": {"normalize": True}}   # typo: refused by name


def _read_back(response: Any) -> Any:
    """The answer as Triton's client reads it."""
    from tritonclient.http import InferResult

    header = response.headers.get(oip.HEADER)
    return InferResult.from_response_body(bytes(response.body), header_length=header and int(header))


def _inputs(binary: bool, outputs: list[str] | None = None) -> oip.Inputs:
    return oip.Inputs("7", [b"x"], True, {}, [oip.RequestedOutput(name=n) for n in outputs] if outputs else None,
                      binary)


@pytest.mark.parametrize("binary", [True, False])
def test_answers_become_tensors_tritonclient_reads(binary: bool) -> None:
    classified = [{"predictions": [{"index": 3, "label": "tabby cat", "score": 0.5},
                                   {"index": 1, "label": "dog", "score": 0.25}]}] * 2
    detected = [{"detections": [{"box": [1.5, 2, 3, 4], "score": 0.9, "label": "face", "index": 0}]},
                {"detections": []},
                {"detections": [{"box": [5, 6, 7, 8.25], "score": 0.8, "label": "face", "index": 0},
                                {"box": [0, 0, 1, 1], "score": 0.7, "label": "cat", "index": 2}]}]
    tensors = (oip.output_tensors("classify", classified, True) + oip.output_tensors("detect", detected, True)[:1]
               + oip.output_tensors("embed", [{"embedding": [0.1, 0.2, 0.3]}], False))
    result = _read_back(oip.infer_response("m", tensors, _inputs(binary), ["random weights"]))
    assert result.get_response()["id"] == "7" and result.get_response()["parameters"] == {"warnings": "random weights"}
    assert [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("labels").reshape(-1)] == [
        "tabby cat", "dog"] * 2
    assert result.as_numpy("labels").shape == (2, 2)
    assert result.as_numpy("indices").tolist() == [[3, 1], [3, 1]]
    assert np.array_equal(result.as_numpy("scores"), np.float32([[0.5, 0.25]] * 2))
    assert np.array_equal(result.as_numpy("boxes"), np.float32([[1.5, 2, 3, 4], [5, 6, 7, 8.25], [0, 0, 1, 1]]))
    assert np.array_equal(result.as_numpy("embedding"), np.float32([0.1, 0.2, 0.3]))   # unbatched: [dim]
    image_index = oip.output_tensors("detect", detected, True)[-1]
    assert image_index.name == "image_index" and image_index.value.tolist() == [0, 2, 2]
    empty = oip.output_tensors("detect", [{"detections": []}], False)
    assert [t.value.shape for t in empty] == [(0, 4), (0,), (0,), (0,), (0,)]


def test_only_the_outputs_asked_for_are_answered_in_their_order() -> None:
    tensors = oip.output_tensors("classify", [{"predictions": [{"index": 0, "label": "a", "score": 1.0}]}], False)
    response = oip.infer_response("m", tensors, _inputs(False, ["scores", "labels"]), [])
    body = json.loads(bytes(response.body))
    assert [o["name"] for o in body["outputs"]] == ["scores", "labels"] and "parameters" not in body
    assert body["outputs"][1] == {"name": "labels", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    assert response.media_type == "application/json" and oip.HEADER not in response.headers


def test_model_metadata_follows_the_tasks() -> None:
    meta = oip.model_metadata("m", ["classify", "embed"], "onnx")
    assert meta["platform"] == "vfm_onnx" and [i["name"] for i in meta["inputs"]] == ["image", "pixels"]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "scores", "indices", "embedding"]
    sam = oip.model_metadata("sam", ["segment"], None)
    assert [o["name"] for o in sam["outputs"]] == ["masks", "masks_uint8", "scores", "areas", "boxes", "prompt_index",
                                                   "image_id"]
    assert [i["name"] for i in sam["inputs"]] == ["image", "pixels"]
    assert oip.model_metadata("x", ["encode"], None) == {"name": "x", "versions": ["1"], "platform": "vfm_torch",
                                                         "inputs": [], "outputs": []}


def test_sam_parameters_are_json_text_and_masks_become_tensors() -> None:
    from vfm.models.masks import decode_rle, mask_to_json

    assert oip.segment_options({"points": "[[220, 140]]", "point_labels": "[1]", "multimask": True}) == {
        "points": [[220, 140]], "point_labels": [1], "multimask": True}
    assert oip.segment_options({"box": [1, 2, 3, 4]}) == {"box": [1, 2, 3, 4]}   # a JSON client's list stays
    with pytest.raises(ApiError, match="points.*is not JSON.*JSON text"):
        oip.segment_options({"points": "220,140"})
    first, second = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    first[1:3, 2:5] = True
    second[0, 0] = True
    answer = {"image_id": "ab" * 32, "cached": False, "image_size": {"height": 4, "width": 6},
              "results": [{"masks": [mask_to_json(first, 0.75)]}, {"masks": [mask_to_json(second, 0.5)]}]}
    result = _read_back(oip.infer_response("sam", oip.segment_tensors(answer, uint8=True), _inputs(True), []))
    rles = [json.loads(b) for b in result.as_numpy("masks")]
    assert [np.array_equal(decode_rle(r), m) for r, m in zip(rles, (first, second))] == [True, True]
    assert np.array_equal(result.as_numpy("masks_uint8"), np.stack([first, second]).astype(np.uint8))
    assert np.array_equal(result.as_numpy("scores"), np.float32([0.75, 0.5]))
    assert result.as_numpy("areas").tolist() == [6, 1]
    assert result.as_numpy("boxes").tolist() == [mask_to_json(first, 0)["bbox"], mask_to_json(second, 0)["bbox"]]
    assert result.as_numpy("prompt_index").tolist() == [0, 1]
    assert result.as_numpy("image_id").tolist() == [b"ab" * 32]
    plain = oip.segment_tensors(answer, uint8=False)
    assert "masks_uint8" not in [t.name for t in plain]


def test_no_input_is_only_for_a_cached_sam_embedding() -> None:
    _refused(400, "No inputs", [])
    assert _request([], parameters={"image_id": "ab" * 32}).images == []

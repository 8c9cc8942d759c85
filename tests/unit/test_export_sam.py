"""SAM exported as two graphs (image encoder, prompt decoder), right on square, portrait and landscape images.

The PyTorch ``SamRunner`` on the same seeded tiny_sam is the reference: ONNX Runtime's masks
must overlap its masks with IoU >= 0.99 and its low-res logits must agree, for points, boxes
and multimask prompts, on images of every aspect ratio (segment-anything's own ONNX decoder
crops its masks for the one aspect ratio it was traced with).
"""
import json

import numpy as np
import pytest
from skimage import data

from vfm.models import load_model
from vfm.models.export import export_model
from vfm.models.export.common import mask_iou, parity_images
from vfm.models.results import Prompt

# (height, width): square, portrait, landscape, and two extremes
SHAPES = {"square": (240, 240), "portrait": (360, 200), "landscape": (180, 420), "tall": (500, 90),
          "wide": (70, 380)}


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    result = export_model("tiny_sam", repo)
    return (result, load_model("tiny_sam", backend="torch", device="cpu"),
            load_model("tiny_sam", backend="onnx", device="cpu", repository=repo))


def prompts_for(height, width):
    return [
        Prompt(points=np.array([[width * 0.3, height * 0.6]]), point_labels=np.array([1])),
        Prompt(points=np.array([[width * 0.7, height * 0.2]]), point_labels=np.array([1]), multimask=True),
        Prompt(points=np.array([[width * 0.5, height * 0.5], [width * 0.9, height * 0.9]]),
               point_labels=np.array([1, 0])),
        Prompt(box=np.array([width * 0.1, height * 0.2, width * 0.8, height * 0.7])),
        Prompt(points=np.array([[width * 0.4, height * 0.4]]), point_labels=np.array([1]),
               box=np.array([width * 0.2, height * 0.1, width * 0.6, height * 0.9]), multimask=True),
    ]


def assert_same_masks(got, expected, shape):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.masks.shape == e.masks.shape and g.masks.shape[1:] == shape
        for mg, me in zip(g.masks, e.masks):
            assert mask_iou(mg, me) >= 0.99
        np.testing.assert_allclose(g.low_res_logits, e.low_res_logits, atol=1e-4)
        np.testing.assert_allclose(g.scores, e.scores, atol=1e-4)


def test_two_graphs_and_their_config(runners):
    result, _, _ = runners
    config = json.loads((result.folder / "config.json").read_text())
    assert sorted(p.name for p in (result.folder / "1").iterdir()) == ["decoder.onnx", "encoder.onnx"]
    encoder, decoder = config["graphs"]["encoder"], config["graphs"]["decoder"]
    assert encoder["inputs"][0]["shape"] == ["batch", 3, 256, 256]
    assert encoder["outputs"][0]["shape"][:2] == ["batch", 256]
    assert [i["name"] for i in decoder["inputs"]] == ["image_embeddings", "point_coords", "point_labels"]
    assert decoder["inputs"][1]["shape"] == ["prompts", "points", 2]
    assert [o["name"] for o in decoder["outputs"]] == ["low_res_masks", "iou_predictions"]
    assert decoder["outputs"][0]["shape"][0] == "prompts"
    # the two-way transformer's 7 attentions run as fused kernels, and parity below holds with them
    assert decoder["optimization"]["fusions"] == {"MultiHeadAttention": 7}
    parity = config["parity"]
    assert parity["mask_iou_min"] >= 0.99 and parity["masks_compared"] > 0
    assert parity["low_res_logits_max_abs_diff"] <= 1e-3


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_masks_right_on_every_aspect_ratio(runners, shape):
    _, torch_runner, onnx_runner = runners
    image = parity_images(seed=sum(shape), sizes=[shape])[0]
    got_embedding = onnx_runner.encode([image])[0]
    expected_embedding = torch_runner.encode([image])[0]
    assert got_embedding.original_size == expected_embedding.original_size == shape
    assert got_embedding.input_size == expected_embedding.input_size
    np.testing.assert_allclose(got_embedding.features, np.asarray(expected_embedding.features), atol=1e-4)
    prompts = prompts_for(*shape)
    expected = torch_runner.segment(expected_embedding, prompts)
    assert_same_masks(onnx_runner.segment(got_embedding, prompts), expected, shape)
    # the masks are not trivially empty or full, so the IoU above says something
    areas = [m.mean() for r in expected for m in r.masks]
    assert 0.02 < np.median(areas) < 0.98


def test_a_real_photo_and_mixed_sizes_in_one_encode(runners):
    _, torch_runner, onnx_runner = runners
    images = [data.astronaut(), data.coffee(), parity_images(seed=5, sizes=[(90, 300)])[0]]
    batch = onnx_runner.encode(images)
    for image, embedding in zip(images, batch):
        alone = onnx_runner.encode([image])[0]
        np.testing.assert_allclose(embedding.features, alone.features, atol=1e-5)
        prompts = prompts_for(*image.shape[:2])
        expected = torch_runner.segment(torch_runner.encode([image])[0], prompts)
        assert_same_masks(onnx_runner.segment(embedding, prompts), expected, image.shape[:2])


def test_embeddings_are_interchangeable_between_backends(runners):
    # a service may cache an embedding from one backend and segment with the other
    _, torch_runner, onnx_runner = runners
    image = parity_images(seed=3, sizes=[(150, 260)])[0]
    prompts = prompts_for(150, 260)
    torch_embedding, onnx_embedding = torch_runner.encode([image])[0], onnx_runner.encode([image])[0]
    assert_same_masks(onnx_runner.segment(torch_embedding, prompts), torch_runner.segment(torch_embedding, prompts),
                      (150, 260))
    assert_same_masks(torch_runner.segment(onnx_embedding, prompts), onnx_runner.segment(onnx_embedding, prompts),
                      (150, 260))


def test_bad_embeddings_and_prompts_are_clear_errors(runners):
    _, _, onnx_runner = runners
    embedding = onnx_runner.encode([parity_images(seed=4, sizes=[(100, 100)])[0]])[0]
    with pytest.raises(ValueError, match="outside"):
        onnx_runner.segment(embedding, [Prompt(points=np.array([[500.0, 5.0]]), point_labels=np.array([1]))])
    embedding.features = embedding.features[:, :, :8]
    with pytest.raises(ValueError, match="shape"):
        onnx_runner.segment(embedding, prompts_for(100, 100))
    with pytest.raises(ValueError, match="empty"):
        onnx_runner.encode([np.zeros((0, 5, 3), np.uint8)])

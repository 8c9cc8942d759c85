"""The detection family through tiny_detector, plus the COCO detectors' structure and weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.models import detection as tvd
from torchvision.ops import box_iou

from vfm.models import Detections, UnsupportedTask, WeightsUnavailable, get_spec, load_model
from vfm.models.families.detection import TorchvisionDetector
from vfm.models.checkpoints import save_state_dict

COCO_DETECTORS = {
    "fasterrcnn_resnet50_fpn_v2": tvd.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    "retinanet_resnet50_fpn_v2": tvd.RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1,
    "ssdlite320_mobilenet_v3_large": tvd.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
}
LOW = 0.05  # tiny_detector's scores spread over (0, 1); this keeps dozens of boxes


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_detector", device="cpu")


def photo(width: int, height: int, source=data.chelsea) -> np.ndarray:
    return np.asarray(Image.fromarray(source()).resize((width, height), Image.BILINEAR))


def boxes_of(result: Detections) -> np.ndarray:
    return np.array([d.box for d in result.detections], np.float64).reshape(-1, 4)


def assert_same(a: Detections, b: Detections) -> None:
    assert a.image_size == b.image_size
    assert [d.label for d in a.detections] == [d.label for d in b.detections]
    np.testing.assert_allclose(boxes_of(a), boxes_of(b), atol=1e-3)
    np.testing.assert_allclose([d.score for d in a.detections], [d.score for d in b.detections], atol=1e-5)


def test_tiny_detector_finds_labelled_boxes_inside_the_image(tiny):
    image = photo(150, 100)
    result = tiny.detect([image], score_threshold=LOW)[0]
    assert result.image_size == (100, 150)
    assert len(result.detections) >= 5
    boxes = boxes_of(result)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 150).all() and (boxes[:, 3] <= 100).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert {d.label for d in result.detections} <= set(get_spec("tiny_detector").labels[1:])
    assert all(get_spec("tiny_detector").labels[d.index] == d.label for d in result.detections)
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True) and min(scores) >= LOW
    assert result.to_json()["detections"][0]["label"] == result.detections[0].label


def test_boxes_are_in_original_pixels(tiny):
    # The model resizes both images to the same input, so the 2x image must give the same
    # boxes times two; boxes left in the network's input frame would not.
    small, large = photo(150, 100), photo(300, 200)
    d_small = tiny.detect([small], score_threshold=LOW, max_detections=1000)[0].detections
    d_large = tiny.detect([large], score_threshold=LOW, max_detections=1000)[0].detections
    halved = torch.tensor([d.box for d in d_large]) / 2
    iou = box_iou(torch.tensor([d.box for d in d_small[:5]]), halved)
    for i, det in enumerate(d_small[:5]):
        same_label = torch.tensor([d.label == det.label for d in d_large])
        assert iou[i][same_label].max() > 0.9


def test_score_threshold_keeps_exactly_the_boxes_above_it(tiny):
    image = photo(150, 100)
    everything = tiny.detect([image], score_threshold=0.0, iou_threshold=0.5, max_detections=1000)[0]
    scores = sorted({d.score for d in everything.detections}, reverse=True)
    cut = (scores[len(scores) // 3] + scores[len(scores) // 3 + 1]) / 2  # between two scores: no ties
    kept = tiny.detect([image], score_threshold=cut, iou_threshold=0.5, max_detections=1000)[0]
    expected = Detections([d for d in everything.detections if d.score >= cut], everything.image_size)
    assert 0 < len(kept.detections) < len(everything.detections)
    assert_same(kept, expected)


def test_max_detections_keeps_the_best(tiny):
    image = photo(150, 100)
    everything = tiny.detect([image], score_threshold=LOW, max_detections=1000)[0]
    top3 = tiny.detect([image], score_threshold=LOW, max_detections=3)[0]
    assert len(everything.detections) > 3
    assert_same(top3, Detections(everything.detections[:3], everything.image_size))


def test_iou_threshold_bounds_the_overlap_of_same_label_boxes(tiny):
    image = photo(150, 100)
    loose = tiny.detect([image], score_threshold=LOW, iou_threshold=0.9, max_detections=1000)[0]
    strict = tiny.detect([image], score_threshold=LOW, iou_threshold=0.1, max_detections=1000)[0]
    assert len(strict.detections) < len(loose.detections)
    for result, limit in ((strict, 0.1), (loose, 0.9)):
        boxes = torch.tensor(boxes_of(result))
        labels = [d.label for d in result.detections]
        iou = box_iou(boxes, boxes)
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                if labels[i] == labels[j]:
                    assert iou[i, j] <= limit + 1e-6


@pytest.mark.parametrize("kwargs", [
    {"score_threshold": -0.1}, {"score_threshold": 1.5}, {"score_threshold": math.nan}, {"score_threshold": "0.5"},
    {"iou_threshold": -0.01}, {"iou_threshold": 2}, {"max_detections": 0}, {"max_detections": -3},
    {"max_detections": 2.5}, {"max_detections": True},
])
def test_bad_options_raise_value_error(tiny, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tiny.detect([photo(64, 48)], **kwargs)


def test_bad_images_raise_typed_errors(tiny):
    with pytest.raises(TypeError, match="image 1"):
        tiny.detect([photo(64, 48), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="empty"):
        tiny.detect([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(UnsupportedTask):
        tiny.classify([photo(64, 48)])
    assert tiny.detect([]) == []


def test_batch_of_different_sizes_equals_one_by_one(tiny):
    # Different aspect ratios: padded into one batch, the smaller ones would see other borders.
    images = [photo(150, 100), photo(90, 140), photo(200, 60), photo(150, 100, source=data.astronaut)]
    batched = tiny.detect(images, score_threshold=LOW)
    assert len(batched) == len(images)
    for image, result in zip(images, batched, strict=True):
        assert_same(result, tiny.detect([image], score_threshold=LOW)[0])


def test_tiny_detector_loads_a_saved_state_dict(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_state_dict(tiny.model.state_dict(), path)
    reloaded = load_model("tiny_detector", device="cpu", weights=str(path))
    image = photo(120, 90)
    assert_same(reloaded.detect([image], score_threshold=LOW)[0], tiny.detect([image], score_threshold=LOW)[0])
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny_detector", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def ssdlite():
    return load_model("ssdlite320_mobilenet_v3_large", device="cpu", weights="random")


@pytest.mark.parametrize("name", sorted(COCO_DETECTORS))
def test_coco_detectors_build_with_random_weights(name, ssdlite):
    runner = ssdlite if name == "ssdlite320_mobilenet_v3_large" else load_model(name, device="cpu", weights="random")
    assert isinstance(runner, TorchvisionDetector) and runner.weights_path is None
    assert runner.labels == tuple(COCO_DETECTORS[name].meta["categories"])
    # The parameter count torchvision publishes for the COCO checkpoint: same architecture.
    assert sum(p.numel() for p in runner.model.parameters()) == COCO_DETECTORS[name].meta["num_params"]
    assert not runner.model.training


def test_coco_weights_sources_match_torchvision():
    for name, enum in COCO_DETECTORS.items():
        source = get_spec(name).weights
        assert source.url == enum.url
        # torchvision's check_hash compares the digest with the hex run after the last "-".
        assert len(source.sha256) >= 8 and Path(enum.url).name.endswith(f"-{source.sha256}.pth")


def test_random_init_is_seeded_and_a_weights_file_loads(ssdlite, tmp_path):
    path = tmp_path / "ssdlite.pth"
    torch.save(ssdlite.model.state_dict(), path)  # a plain state dict, as torchvision publishes
    reloaded = load_model("ssdlite320_mobilenet_v3_large", device="cpu", weights=str(path))
    assert all(torch.equal(v, reloaded.model.state_dict()[k]) for k, v in ssdlite.model.state_dict().items())
    images = [photo(160, 120), photo(100, 200)]  # SSD resizes to 320x320: any sizes batch together
    batched = reloaded.detect(images, score_threshold=0.0, max_detections=20)
    for image, result in zip(images, batched, strict=True):
        assert len(result.detections) == 20
        assert_same(result, ssdlite.detect([image], score_threshold=0.0, max_detections=20)[0])


def test_a_checkpoint_of_another_model_is_refused(ssdlite, tmp_path):
    path = tmp_path / "ssdlite.safetensors"
    save_state_dict(ssdlite.model.state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not fit model 'tiny_detector'"):
        load_model("tiny_detector", device="cpu", weights=str(path))


def test_offline_without_weights_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no stray copy in torch's hub cache
    expected = tmp_path / "cache" / "fasterrcnn_resnet50_fpn_v2" / "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"
    with pytest.raises(WeightsUnavailable) as info:
        load_model("fasterrcnn_resnet50_fpn_v2", device="cpu")
    message = str(info.value)
    assert str(expected) in message and "VFM_OFFLINE=1" in message
    assert COCO_DETECTORS["fasterrcnn_resnet50_fpn_v2"].url in message


def test_a_checkpoint_with_a_wrong_shaped_tensor_is_one_clear_error(tiny, tmp_path):
    # Right names, one tensor of another shape (e.g. a head trained for other classes): the same
    # WeightsUnavailable every family gives, naming the tensor, not PyTorch's multi-line RuntimeError.
    state = dict(tiny.model.state_dict())
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 64)
    path = tmp_path / "reshaped.safetensors"
    save_state_dict(state, path)
    with pytest.raises(WeightsUnavailable, match=r"does not fit model 'tiny_detector': size mismatch for "
                                                 r"roi_heads\.box_predictor\.cls_score\.weight") as info:
        load_model("tiny_detector", device="cpu", weights=str(path))
    assert "\n" not in str(info.value)

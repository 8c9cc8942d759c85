"""ONNX export of detectors: one image of any height and width per graph call, outputs named by the model.

tiny_detector is a seeded random Faster R-CNN that fires on the structured test images;
ssdlite320 (random weights, a low min_score) orders its outputs differently; mtcnn_faces has
its real weights and finds the astronaut's face.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.models import detection as tvd

from vfm.models import load_model
from vfm.models.export import export_model
from vfm.models.export.common import parity_images
from vfm.models.families.detection import build_torchvision_detector
from vfm.models.registry import get_spec, register, unregister

# landscape, portrait, square, wide strip, portrait downscaled. tiny_detector resizes them to
# multiples of its 32-pixel stride, so no padding gives anchors bit-identical scores to tie on.
SIZES = [(240, 480), (320, 160), (200, 200), (96, 320), (400, 200)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_repository")
    export_model("tiny_detector", root)
    export_model("mtcnn_faces", root)
    return root


@pytest.fixture(scope="module")
def tiny(repo):
    return (load_model("tiny_detector", backend="torch", device="cpu"),
            load_model("tiny_detector", backend="onnx", device="cpu", repository=repo))


def assert_same_detections(got, expected, box_px=0.05, score=1e-3, ties=3):
    """Same detections (label, box within ``box_px``, score within ``score``), matched by label and nearest box.

    Up to ``ties`` detections per image may differ: padding gives anchors bit-identical scores,
    PyTorch and ONNX Runtime break exact ties in top-k differently, so a different proposal
    wins, and NMS then keeps or drops its neighbours. A real fault changes most detections.
    """
    assert got.image_size == expected.image_size
    unused = list(got.detections)
    missing = 0
    for e in expected.detections:
        near = [g for g in unused if g.label == e.label and np.abs(np.subtract(g.box, e.box)).max() <= box_px]
        if not near:
            missing += 1
            continue
        g = min(near, key=lambda d: np.abs(np.subtract(d.box, e.box)).max())
        unused.remove(g)
        assert abs(g.score - e.score) <= score
        if "landmarks" in e.extra:
            np.testing.assert_allclose(g.extra["landmarks"], e.extra["landmarks"], atol=box_px)
    assert missing <= ties and len(unused) <= ties, (missing, len(unused), len(expected.detections))
    return len(expected.detections) - missing


def test_config_names_outputs_from_the_model_and_records_parity(repo):
    config = json.loads((repo / "tiny_detector" / "config.json").read_text())
    graph = config["graphs"]["model"]
    assert graph["inputs"][0]["shape"] == [3, "height", "width"]
    assert [o["name"] for o in graph["outputs"]] == ["boxes", "labels", "scores"]  # Faster R-CNN's dict order
    assert config["runtime"]["min_score"] == 0.05
    parity = config["parity"]
    assert parity["detections_compared"] > 0
    assert parity["box_max_abs_diff_px"] <= parity["tolerance"]["box_atol_px"] + parity["tolerance"]["box_rtol"] * 517


@pytest.mark.parametrize("args", [dict(score_threshold=0.3, iou_threshold=0.5, max_detections=100),
                                  dict(score_threshold=0.6, iou_threshold=0.8, max_detections=5),
                                  dict(score_threshold=0.05, iou_threshold=0.2, max_detections=300)])
def test_tiny_detector_onnx_matches_torch_on_every_aspect_ratio(tiny, args):
    torch_runner, onnx_runner = tiny
    images = parity_images(seed=7, sizes=SIZES)
    expected, got = torch_runner.detect(images, **args), onnx_runner.detect(images, **args)
    total = sum(len(d.detections) for d in expected)
    assert total > 0, "the test images must produce detections"
    matched = sum(assert_same_detections(g, e) for g, e in zip(got, expected))
    assert matched >= 0.95 * total


def test_a_batch_of_mixed_sizes_answers_as_one_by_one(tiny):
    _, onnx_runner = tiny
    images = parity_images(seed=8, sizes=SIZES)
    batch = onnx_runner.detect(images, score_threshold=0.3)
    alone = [onnx_runner.detect([im], score_threshold=0.3)[0] for im in images]
    assert [b.to_json() for b in batch] == [a.to_json() for a in alone]


def test_a_score_threshold_below_the_exported_floor_is_refused(tiny):
    _, onnx_runner = tiny
    with pytest.raises(ValueError, match="vfm export tiny_detector --min-score 0.01"):
        onnx_runner.detect(parity_images(seed=9, sizes=[(64, 64)]), score_threshold=0.01)


@pytest.fixture
def spread_ssdlite():
    """SSDlite with seeded He-initialised weights. torchvision's own init makes a random SSDlite's
    activations vanish (every class scores exactly 1/91), which leaves nothing to compare."""
    spec = get_spec("ssdlite320_mobilenet_v3_large")

    def build(spec, weights_path, device, dtype=None):
        runner = build_torchvision_detector(spec, None, device, tvd.ssdlite320_mobilenet_v3_large,
                                            fixed_input_size=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for module in runner.model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    if module.bias is not None:
                        module.bias.zero_()
        return runner

    register(dataclasses.replace(spec, name="test_ssdlite_spread", builder=build, weights=None, random_weights=True))
    yield "test_ssdlite_spread"
    unregister("test_ssdlite_spread")


def test_ssd_outputs_come_in_its_own_order(spread_ssdlite, tmp_path):
    result = export_model(spread_ssdlite, tmp_path, max_candidates=300)
    assert [o["name"] for o in result.config["graphs"]["model"]["outputs"]] == ["boxes", "scores", "labels"]
    assert result.parity["detections_compared"] > 0
    images = parity_images(seed=10, sizes=[(240, 180), (150, 330)])
    args = dict(score_threshold=0.9, iou_threshold=0.5, max_detections=30)
    expected = load_model(spread_ssdlite, device="cpu").detect(images, **args)
    got = load_model(spread_ssdlite, backend="onnx", device="cpu", repository=tmp_path).detect(images, **args)
    assert sum(len(d.detections) for d in expected) > 0
    for g, e in zip(got, expected):
        assert_same_detections(g, e, ties=0)


def test_mtcnn_real_weights_find_the_same_face_and_landmarks(repo):
    config = json.loads((repo / "mtcnn_faces" / "config.json").read_text())
    assert sorted(config["graphs"]) == ["onet", "pnet", "rnet"]
    assert config["graphs"]["pnet"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert config["session"]["allow_spinning"] is False  # the cascade's torch work needs the cores between runs
    torch_runner = load_model("mtcnn_faces", device="cpu")
    onnx_runner = load_model("mtcnn_faces", backend="onnx", device="cpu", repository=repo)
    for net in ("pnet", "rnet", "onet"):  # the replica leaves it to the export
        options = onnx_runner.networks[net].session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    images = [data.astronaut(), data.astronaut()[40:300, 100:400], parity_images(seed=11, sizes=[(120, 90)])[0]]
    expected, got = torch_runner.detect(images, score_threshold=0.9), onnx_runner.detect(images, score_threshold=0.9)
    assert len(expected[0].detections) >= 1 and len(expected[1].detections) >= 1
    for g, e in zip(got, expected):
        assert_same_detections(g, e, box_px=0.01, ties=0)

"""Detect, then segment, in-process: the real mtcnn_faces on a real face, and tiny_detector, each feeding a SAM.

``SAM`` names the segmenter every test uses; point it at another SAM of the zoo (with its load
options) to run the same checks on it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data

from vfm.models import UnsupportedTask, load_model
from vfm.models.masks import decode_rle
from vfm.models.pipelines import SegmentedDetections, box_prompt, detect_then_segment

SAM = "tiny_sam"
SAM_OPTIONS: dict = {"device": "cpu"}
SAM_CLI_OPTIONS: list[str] = []    # the same for `vfm predict`, e.g. ["--backend", "onnx"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")


@pytest.fixture(scope="module")
def sam():
    return load_model(SAM, **SAM_OPTIONS)


@pytest.fixture(scope="module")
def faces():
    return load_model("mtcnn_faces", device="cpu")


@pytest.fixture(scope="module")
def tiny_detector():
    return load_model("tiny_detector", device="cpu")


def test_the_astronauts_face_gets_one_box_and_one_mask_at_the_image_size(faces, sam):
    astronaut = data.astronaut()
    (found,) = detect_then_segment(faces, sam, [astronaut])
    assert found.image_size == (512, 512)
    (face,) = found.detections
    assert face.label == "face" and face.score > 0.9
    assert face.box == faces.detect([astronaut])[0].detections[0].box   # the detector's own answer
    (masks,) = found.masks
    assert masks.masks.shape == (1, 512, 512) and masks.masks.dtype == bool and masks.scores.shape == (1,)
    # The box went to the SAM as a box prompt, in the same decoder call it makes for any prompt list.
    alone = sam.segment(sam.encode([astronaut])[0], [box_prompt(face.box)])[0]
    np.testing.assert_array_equal(masks.masks, alone.masks)
    np.testing.assert_allclose(masks.scores, alone.scores, rtol=1e-5)


def test_json_pairs_each_detection_with_its_masks(faces, sam):
    (found,) = detect_then_segment(faces, sam, [data.astronaut()])
    answer = found.to_json("rle")
    assert answer["image_size"] == {"height": 512, "width": 512}
    (face,) = answer["detections"]
    assert set(face) == {"box", "score", "label", "index", "landmarks", "masks"}
    assert face["label"] == "face" and len(face["box"]) == 4 and len(face["landmarks"]) == 5
    (mask,) = face["masks"]
    decoded = decode_rle(mask["rle"])
    assert decoded.shape == (512, 512) and mask["area"] == int(decoded.sum())
    np.testing.assert_array_equal(decoded, found.masks[0].masks[0])
    assert set(found.to_json("polygons")["detections"][0]["masks"][0]) == {"score", "area", "bbox", "polygons"}


def test_tiny_detector_boxes_each_get_masks_and_several_images_run_together(tiny_detector, sam):
    images = [data.chelsea(), data.astronaut()[:300, :200]]
    results = detect_then_segment(tiny_detector, sam, images, score_threshold=0.3, max_detections=5,
                                  multimask=True)
    detected = tiny_detector.detect(images, score_threshold=0.3, max_detections=5)
    for image, result, expected in zip(images, results, detected, strict=True):
        assert result.image_size == image.shape[:2]
        assert [d.box for d in result.detections] == [d.box for d in expected.detections]
        assert 1 <= len(result.detections) <= 5
        assert len(result.masks) == len(result.detections)
        assert all(m.masks.shape == (3, *image.shape[:2]) for m in result.masks)  # multimask: three per box


def test_no_detection_is_an_empty_list_not_an_error(faces, sam):
    coffee, blank = data.coffee(), np.full((64, 80, 3), 128, np.uint8)
    results = detect_then_segment(faces, sam, [coffee, blank])
    assert [r.detections for r in results] == [[], []] and [r.masks for r in results] == [[], []]
    assert results[0].to_json() == {"image_size": {"height": 400, "width": 600}, "detections": []}
    assert isinstance(results[1], SegmentedDetections) and results[1].image_size == (64, 80)


def test_the_detector_must_detect_and_the_segmenter_must_segment(faces, sam):
    image = data.astronaut()
    with pytest.raises(UnsupportedTask, match=f"'{SAM}' is not a detector"):
        detect_then_segment(sam, sam, [image])
    with pytest.raises(UnsupportedTask, match="'mtcnn_faces' is not a SAM"):
        detect_then_segment(faces, faces, [image])
    with pytest.raises(ValueError, match="score_threshold"):
        detect_then_segment(faces, sam, [image], score_threshold=2.0)


# ---- from the command line -------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut_path(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def test_cli_writes_one_mask_per_face_and_prints_boxes_and_labels(capsys, astronaut_path, tmp_path):
    from PIL import Image

    from vfm.cli import main

    argv = ["predict", SAM, str(astronaut_path), *SAM_CLI_OPTIONS, "--detector", "mtcnn_faces",
            "--score-threshold", "0.9", "--out", str(tmp_path)]
    assert main([*argv, "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["image"] == str(astronaut_path) and answer["image_size"] == {"height": 512, "width": 512}
    (face,) = answer["detections"]
    assert face["label"] == "face" and len(face["box"]) == 4
    (mask,) = face["masks"]
    assert mask["png"] == str(tmp_path / "astronaut.det0.mask0.png")
    picture = np.asarray(Image.open(mask["png"]))
    assert picture.shape == (512, 512) and int((picture > 0).sum()) == mask["area"]

    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(astronaut_path) and "face" in lines[1] and "box=" in lines[1]
    assert lines[2].strip().startswith("mask score=") and lines[2].endswith("astronaut.det0.mask0.png")


@pytest.mark.parametrize("extra, needle", [
    (["--detector", "tiny_cnn"], "'tiny_cnn' is not a detector"),
    (["--detector", "mtcnn_faces", "--point", "10,10"], "drop --point/--box"),
    (["--detector", "mtcnn_faces", "--task", "detect"], "does not go with --task detect"),
    (["--detector", "mtcnn_faces", "--score-threshold", "1.5"], "--score-threshold"),
    (["--detector", "no_such_detector"], "no_such_detector"),
])
def test_cli_bad_detector_options_are_one_line_usage_errors(capsys, astronaut_path, extra, needle):
    from vfm.cli import main

    assert main(["predict", SAM, str(astronaut_path), *SAM_CLI_OPTIONS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_cli_the_named_model_must_be_a_sam(capsys, astronaut_path):
    from vfm.cli import main

    assert main(["predict", "tiny_cnn", str(astronaut_path), "--detector", "mtcnn_faces"]) == 2
    assert "--detector prompts a SAM; 'tiny_cnn' does" in capsys.readouterr().err

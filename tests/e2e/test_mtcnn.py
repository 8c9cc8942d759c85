"""mtcnn_faces with the real weights shipped in facenet-pytorch, on real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.feature import Cascade

from vfm.models import load_model
from vfm.models.families.mtcnn import facenet_data_dir
from vfm.models.checkpoints import load_state_dict

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")


@pytest.fixture(scope="module")
def mtcnn():
    return load_model("mtcnn_faces", device="cpu")


def reference_face(image: np.ndarray) -> tuple[float, float, float]:
    """Centre x, centre y and side of the one face scikit-image's LBP cascade finds: an
    independent detector, so the test does not take MTCNN's word for where the face is."""
    cascade = Cascade(data.lbp_frontal_face_cascade_filename())
    faces = cascade.detect_multi_scale(img=image, scale_factor=1.2, step_ratio=1, min_size=(60, 60),
                                       max_size=(300, 300))
    assert len(faces) == 1
    face = faces[0]
    return face["c"] + face["width"] / 2, face["r"] + face["height"] / 2, float(face["width"])


def test_weights_come_from_the_facenet_package(mtcnn):
    assert mtcnn.weights_path == facenet_data_dir()
    shipped = load_state_dict(facenet_data_dir() / "onet.pt")
    assert torch.equal(mtcnn.torch_module("onet").state_dict()["dense6_3.weight"], shipped["dense6_3.weight"])


def test_finds_the_astronauts_face(mtcnn):
    image = data.astronaut()
    cx, cy, side = reference_face(image)
    result = mtcnn.detect([image])[0]
    assert result.image_size == image.shape[:2]
    assert len(result.detections) == 1
    face = result.detections[0]
    x0, y0, x1, y1 = face.box
    assert face.label == "face" and face.score > 0.9
    assert x0 < cx < x1 and y0 < cy < y1
    assert 0.5 * side < x1 - x0 < 2 * side and 0.5 * side < y1 - y0 < 2 * side
    landmarks = np.array(face.extra["landmarks"])
    assert landmarks.shape == (5, 2)
    assert ((landmarks >= [x0, y0]) & (landmarks <= [x1, y1])).all()
    assert landmarks[0, 0] < landmarks[1, 0]  # the eye on the image's left comes first
    assert "landmarks" in face.to_json()


def test_no_face_in_coffee(mtcnn):
    assert mtcnn.detect([data.coffee()])[0].detections == []


def test_batch_equals_one_by_one_and_a_mirror_mirrors_the_box(mtcnn):
    astronaut = data.astronaut()
    images = [astronaut, data.coffee(), np.ascontiguousarray(astronaut[:, ::-1])]
    batched = mtcnn.detect(images)
    for image, result in zip(images, batched, strict=True):
        alone = mtcnn.detect([image])[0]
        assert [d.label for d in result.detections] == [d.label for d in alone.detections]
        for a, b in zip(result.detections, alone.detections, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.score, b.score, atol=1e-5)
            np.testing.assert_allclose(a.extra["landmarks"], b.extra["landmarks"], atol=0.02)
    (face,), (mirrored,) = batched[0].detections, batched[2].detections
    width = astronaut.shape[1]
    x0, y0, x1, y1 = face.box
    expected = torch.tensor([[width - x1, y0, width - x0, y1]])
    from torchvision.ops import box_iou

    assert box_iou(expected, torch.tensor([mirrored.box])).item() > 0.8


def test_threshold_and_options(mtcnn):
    image = data.astronaut()
    score = mtcnn.detect([image])[0].detections[0].score
    assert mtcnn.detect([image], score_threshold=min(1.0, score + 1e-6))[0].detections == []
    permissive = mtcnn.detect([image], score_threshold=0.0, max_detections=1000)[0].detections
    assert len(permissive) > 1 and permissive[0].score == pytest.approx(score)
    assert len(mtcnn.detect([image], score_threshold=0.0, max_detections=1)[0].detections) == 1
    with pytest.raises(ValueError, match="iou_threshold"):
        mtcnn.detect([image], iou_threshold=1.5)


def test_images_smaller_than_a_face_give_no_detections(mtcnn):
    results = mtcnn.detect([np.zeros((10, 15, 3), np.uint8), np.full((19, 400, 3), 200, np.uint8)])
    assert [r.detections for r in results] == [[], []]
    assert [r.image_size for r in results] == [(10, 15), (19, 400)]


def test_grey_photo_of_a_person(mtcnn):
    # The cameraman: a single-channel photo goes through the same RGB path.
    faces = mtcnn.detect([data.camera()])[0].detections
    assert len(faces) == 1 and faces[0].score > 0.9


def test_min_face_size_option():
    # The astronaut's face is about 90 pixels wide; a search that starts at 400-pixel faces
    # (the pyramid's finest scale) misses it.
    large_only = load_model("mtcnn_faces", device="cpu", min_face_size=400)
    assert large_only.detect([data.astronaut()])[0].detections == []
    with pytest.raises(ValueError, match="min_face_size"):
        load_model("mtcnn_faces", device="cpu", min_face_size=5)
    with pytest.raises(ValueError, match="stage_thresholds"):
        load_model("mtcnn_faces", device="cpu", stage_thresholds=(0.6, 1.5))

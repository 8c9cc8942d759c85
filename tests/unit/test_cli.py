"""The `vfm` command line, run in-process (and once as the installed console script)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vfm.cli import main


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path)
    return path


def test_models_list_with_wildcard(capsys):
    assert main(["models", "list", "sam_*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "TASKS", "AVAILABILITY", "WEIGHTS"]
    assert [line.split()[0] for line in out[1:]] == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]


def test_models_info_json(capsys):
    assert main(["models", "info", "tiny_cnn", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "tiny_cnn" and "embed" in info["tasks"] and info["random_weights"]


def test_unknown_model_is_a_usage_error_with_suggestions(capsys):
    assert main(["models", "info", "efficientnet_lite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "efficientnet_lite0" in err


def test_weights_where_names_a_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path))
    assert main(["weights", "where", "sam_vit_b"]) == 0
    assert str(tmp_path / "sam_vit_b" / "sam_vit_b_01ec64.pth") in capsys.readouterr().out


def test_predict_classify_json(capsys, photo_path):
    assert main(["predict", "tiny_cnn", str(photo_path), "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 1 and len(out[0]["predictions"]) == 3
    assert out[0]["image"] == str(photo_path)


def test_predict_embed(capsys, photo_path):
    assert main(["predict", "tiny_cnn", str(photo_path), str(photo_path), "--task", "embed", "--json",
                 "--normalize"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and out[0]["embedding"] == out[1]["embedding"]
    assert abs(np.linalg.norm(out[0]["embedding"]) - 1) < 1e-3


def test_predict_detect(capsys, photo_path):
    assert main(["predict", "tiny_detector", str(photo_path), "--score-threshold", "0.0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "detections" in out[0]


def test_predict_segment_writes_mask_png(capsys, photo_path, tmp_path):
    assert main(["predict", "tiny_sam", str(photo_path), "--point", "200,150", "--point", "10,10,0",
                 "--multimask", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    masks = out[0]["masks"]
    assert len(masks) == 3
    mask = np.asarray(Image.open(masks[0]["png"]))
    assert mask.shape == (300, 451)  # the photo's size, not the encoder's


def test_predict_everything_writes_one_png_per_mask_largest_first(capsys, photo_path, tmp_path):
    assert main(["predict", "tiny_sam", str(photo_path), "--everything", "--points-per-side", "3",
                 "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)[0]
    assert out["points"] == 9 and len(out["masks"]) >= 1
    assert [m["area"] for m in out["masks"]] == sorted((m["area"] for m in out["masks"]), reverse=True)
    for m in out["masks"]:
        mask = np.asarray(Image.open(m["png"])) > 0
        assert mask.shape == (300, 451) and int(mask.sum()) == m["area"]
        assert {"score", "stability_score", "bbox", "point"} <= set(m)


@pytest.mark.parametrize("argv, code, needle", [
    (["predict", "tiny_sam", "{img}"], 2, "needs a prompt"),
    (["predict", "tiny_sam", "{img}", "--everything", "--point", "1,2"], 2, "--everything takes no prompt"),
    (["predict", "tiny_sam", "{img}", "--everything", "--points-per-side", "0"], 2, "--points-per-side must be"),
    (["predict", "tiny_sam", "{img}", "--everything", "--nms-thresh", "1.5"], 2, "--nms-thresh must be"),
    (["predict", "tiny_cnn", "{img}", "--everything"], 2, "does not segment"),
    (["predict", "tiny_sam", "{img}", "--point", "1,nan"], 2, "--point"),
    (["predict", "tiny_cnn", "{img}", "--top-k", "0"], 2, "--top-k"),
    (["predict", "tiny_cnn", "{img}", "--task", "detect"], 2, "does not detect"),
    (["predict", "tiny_cnn", "/no/such/file.jpg"], 1, "cannot read"),
    (["predict", "tiny_cnn", "{text}"], 1, "not an image"),
])
def test_bad_input_is_one_line(capsys, photo_path, tmp_path, argv, code, needle):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    argv = [a.format(img=photo_path, text=text) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_console_script_exit_codes(tmp_path):
    exe = [sys.executable, "-m", "vfm"]
    ok = subprocess.run(exe + ["models", "list", "tiny_*"], capture_output=True, text=True)
    assert ok.returncode == 0 and "tiny_cnn" in ok.stdout
    usage = subprocess.run(exe + ["predict"], capture_output=True, text=True)
    assert usage.returncode == 2

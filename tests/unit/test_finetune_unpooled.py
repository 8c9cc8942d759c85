"""`vfm finetune train --unpooled N`: a head on the activations that enter the backbone's last N blocks, unpooled and
flattened; the result is a model (the backbone cut there, then the head) that `vfm finetune publish` puts where
`load_model`, `vfm predict` and `vfm export` find it by name. With `--unfreeze M` the M blocks before the cut train
with that head (`--unfreeze 1 --unpooled 0`: the last block, its output unpooled).

Real data (300 Fashion-MNIST images), the real tiny_cnn, real files; a few seconds per run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vfm.cli import main

FASHION = "idx:/usr/share/datasets/fashion-mnist"
TRAIN = ["finetune", "train", "--backbone", "tiny_cnn", "--data", FASHION, "--limit", "300", "--device", "cpu",
         "--quiet"]

pytestmark = pytest.mark.usefixtures("forget_published_models")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unpooled") / "run"
    assert main([*TRAIN, "--unpooled", "1", "--head", "linear", "--optimizer", "lbfgs", "--C", "0.1,1",
                 "--out", str(out), "--no-cache"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unpooled-trained") / "run"
    assert main([*TRAIN, "--unfreeze", "1", "--unpooled", "0", "--head", "linear", "--lr", "0.01", "--epochs", "4",
                 "--out", str(out), "--no-cache"]) == 0
    return out


def test_unfreeze_with_unpooled_trains_the_last_block_under_a_head_on_its_map(trained_run: Path) -> None:
    from safetensors.torch import load_file

    from vfm.models import load_model

    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["unfreeze"] == 1 and meta["unpooled"] == 0 and meta["head"]["type"] == "linear"
    c, h, w = meta["activations_shape"]
    assert meta["feature_dim"] == c * h * w > 1000 and h > 1  # the last conv layer's map, not pooled
    tensors = load_file(str(trained_run / "model.safetensors"))
    base = load_model("tiny_cnn", device="cpu").state_dict()
    # the first two conv layers frozen, the third trained; nothing after it (tiny_cnn's pooling) in the model
    assert np.array_equal(tensors["body.0.0.0.weight"].numpy(), base["conv0.weight"].numpy())
    assert np.array_equal(tensors["body.0.1.0.weight"].numpy(), base["conv1.weight"].numpy())
    assert tensors["body.0.2.0.weight"].shape == base["conv2.weight"].shape
    assert not np.allclose(tensors["body.0.2.0.weight"].numpy(), base["conv2.weight"].numpy())
    assert not any(key.startswith("body.0.3.") for key in tensors)
    assert tensors["head.net.0.weight"].shape == (10, meta["feature_dim"])
    history = json.loads((trained_run / "run.json").read_text())["heads"][0]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_run_is_a_model_cut_before_the_last_block(run: Path) -> None:
    from safetensors.torch import load_file

    from vfm.models import load_model

    meta = json.loads((run / "model.json").read_text())
    assert meta["base"] == "tiny_cnn" and meta["unpooled"] == 1 and meta["head"]["type"] == "linear"
    c, h, w = meta["activations_shape"]
    assert meta["feature_dim"] == c * h * w > 1000  # the map, not tiny_cnn's pooled features
    assert not (run / "head.json").exists()
    tensors = load_file(str(run / "model.safetensors"))
    base = load_model("tiny_cnn", device="cpu").state_dict()
    # the first two conv layers, untouched; the third (the last block) is not in the model at all
    assert np.array_equal(tensors["body.0.0.0.weight"].numpy(), base["conv0.weight"].numpy())
    assert np.array_equal(tensors["body.0.1.0.weight"].numpy(), base["conv1.weight"].numpy())
    assert not any(key.startswith("body.0.2.") for key in tensors)
    assert tensors["head.net.0.weight"].shape == (10, meta["feature_dim"])


@pytest.mark.parametrize("which", ["run", "trained_run"])
def test_the_published_model_predicts_as_in_the_run_on_pytorch_and_onnx(which: str, request: pytest.FixtureRequest,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from vfm.finetune.data import open_dataset
    from vfm.finetune.splits import make_splits
    from vfm.models import get_spec, load_model

    run = request.getfixturevalue(which)
    monkeypatch.setenv("VFM_MODELS_DIR", str(tmp_path / "models"))
    assert main(["finetune", "publish", str(run), "--name", "fashion_tiny_unpooled"]) == 0
    assert "as model fashion_tiny_unpooled" in capsys.readouterr().out
    description = get_spec("fashion_tiny_unpooled").description
    assert "unpooled" in description and ("fine-tuned" in description) == (which == "trained_run")

    # The run's test split, classified by the model loaded by name: the run's test accuracy again.
    data = open_dataset(FASHION)
    test = make_splits(data, (0.8, 0.1, 0.1), 0, 300).test
    runner = load_model("fashion_tiny_unpooled", device="cpu")
    images = [data.source.load(int(i)) for i in test]
    top = np.array([c.top[0].index for c in runner.classify(images, top_k=1)])
    recorded = json.loads((run / "run.json").read_text())["test"]["accuracy"]
    assert np.mean(top == data.labels[test]) == pytest.approx(recorded)

    Image.fromarray(images[0]).save(tmp_path / "item.png")
    assert main(["predict", "fashion_tiny_unpooled", str(tmp_path / "item.png"), "--top-k", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]["predictions"]
    expected = runner.classify([np.asarray(Image.open(tmp_path / "item.png").convert("RGB"))], top_k=2)[0].top
    assert [p["label"] for p in answer] == [t.label for t in expected]

    assert main(["export", "fashion_tiny_unpooled", "--out", str(tmp_path / "repo")]) == 0
    on_onnx = load_model("fashion_tiny_unpooled", backend="onnx", device="cpu", repository=tmp_path / "repo")
    features, logits = runner.features_and_logits(images[:8])
    features_onnx, logits_onnx = on_onnx.features_and_logits(images[:8])
    assert features.shape[1] == json.loads((run / "model.json").read_text())["feature_dim"]
    assert np.allclose(logits_onnx, logits, atol=1e-4) and np.allclose(features_onnx, features, atol=1e-4)


@pytest.mark.parametrize("which", ["run", "trained_run"])
def test_finetune_eval_scores_the_model_run_as_the_model_does(which: str, request: pytest.FixtureRequest,
                                                              eval_agrees_with_the_model) -> None:
    eval_agrees_with_the_model(request.getfixturevalue(which))


@pytest.mark.parametrize("argv, message", [
    (["--backend", "onnx"], "--backend onnx does not apply to a model run"),
    (["--ray-address", "local"], "--ray-address does not apply to a model run"),
])
def test_eval_of_a_model_run_refuses_what_does_not_apply_in_one_line(run: Path, argv: list[str], message: str,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", "eval", str(run), "--data", FASHION, "--limit", "20", "--quiet", "--no-cache",
                 "--out", str(tmp_path / "eval"), *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "eval").exists()


def test_a_damaged_unpooled_entry_is_refused_in_one_line(run: Path, tmp_path: Path) -> None:
    import shutil

    from vfm.models.published import InvalidModel, network_module, read_meta

    for bad, message in ((-1, "at least 0, not -1"), (4, "between 0 and 3, got 4"), ("1", "at least 0, not '1'")):
        folder = tmp_path / f"bad{bad}"
        shutil.copytree(run, folder)
        meta = json.loads((folder / "model.json").read_text())
        meta["unpooled"] = bad
        (folder / "model.json").write_text(json.dumps(meta))
        with pytest.raises(InvalidModel, match=message):
            network_module(read_meta(folder))


@pytest.mark.parametrize("argv, message", [
    (["--unpooled", "-1"], "--unpooled must be >= 0"),
    (["--unpooled", "4"], "tiny_cnn has 3 conv layers; give at most 3"),
    (["--unpooled", "2", "--unfreeze", "2"], "tiny_cnn has 3 conv layers; the two together may be at most 3"),
    (["--unpooled", "0", "--unfreeze", "1", "--head", "knn"], "--unpooled writes a model with a trained head"),
    (["--unpooled", "0", "--unfreeze", "1", "--backend", "onnx"], "--backend does not apply with --unpooled"),
    (["--unpooled", "1", "--head", "knn"], "--unpooled writes a model with a trained head"),
    (["--unpooled", "1", "--backend", "onnx"], "--backend does not apply with --unpooled"),
    (["--unpooled", "1", "--normalize"], "--normalize does not apply with --unpooled"),
    (["--unpooled", "1", "--resume"], "--resume does not apply with --unpooled"),
    (["--unpooled", "x"], "--unpooled"),
])
def test_bad_unpooled_flags_are_one_line_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*TRAIN, "--out", str(tmp_path / "run"), "--no-cache", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_backbone_without_known_blocks_is_refused_in_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", "train", "--backbone", "tiny_vit", "--data", FASHION, "--limit", "100", "--unpooled",
                 "1", "--out", str(tmp_path / "run"), "--quiet", "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tiny_vit" in err
    assert not (tmp_path / "run" / "model.json").exists()


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_lite0"])
def test_the_frozen_part_then_the_blocks_before_the_cut_is_the_cut_body(name: str) -> None:
    """`--unfreeze N --unpooled K`: the cached activations through the trainable part are what the model's cut body
    computes (the blocks before the cut, flattened), for every N that fits, and the last blocks are not run."""
    import torch

    from vfm.finetune.unfreeze import FrozenPart
    from vfm.models import load_model
    from vfm.models.blocks import chain_of, unpooled_body

    size = load_model(name, device="cpu").spec.preprocess.size
    x = torch.randn(2, 3, size, size)
    count = chain_of(name, load_model(name, device="cpu").network.module.body).count
    for unpooled in (0, 1):
        body = unpooled_body(name, load_model(name, device="cpu").network.module.body, unpooled)
        with torch.no_grad():
            whole = body(x)
        for unfreeze in (1, count - unpooled) if name == "tiny_cnn" else (1,):  # all of lite0's 16: slow, no news
            part = FrozenPart(name, unfreeze, "cpu", unpooled=unpooled)
            with torch.no_grad():
                out = part.trainable(part.activations(x))
            assert out.shape == whole.shape and torch.allclose(out, whole, rtol=1e-4, atol=1e-4)  # channels-last
            assert part.out_dim == whole.shape[1] == int(np.prod(part.out_shape))
            assert len(part.out_shape) == 3 and part.out_shape[1] > 1  # a map, not pooled

"""`vfm finetune train --unfreeze N`: the backbone's last blocks train with the head, and the result is a model
that `vfm finetune publish` puts where `load_model`, `vfm predict` and `vfm export` find it by name.

Real data (300 Fashion-MNIST images), the real tiny_cnn, real files; a few seconds per run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vfm.cli import main
from vfm.finetune.config import ConfigError, TrainConfig

FASHION = "idx:/usr/share/datasets/fashion-mnist"
COMMON = dict(head="linear", lrs="0.01", epochs=10, limit=300, seed=0)

pytestmark = pytest.mark.usefixtures("forget_published_models")


def _features(cache: Path):
    from vfm.finetune.config import FeatureOptions

    return FeatureOptions(device="cpu", cache_dir=cache, progress=False)

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """The same data, epochs, rate and seed: a frozen run (a head on cached features) and an --unfreeze 1 run."""
    from vfm.finetune.pipeline import train_run
    from vfm.finetune.unfreeze import unfreeze_run

    root = tmp_path_factory.mktemp("unfreeze")
    frozen = train_run(TrainConfig("tiny_cnn", FASHION, out=root / "frozen", features=_features(root / "cache"),
                                   **COMMON))
    unfrozen = unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=root / "unfrozen", unfreeze=1,
                                        features=_features(root / "cache"), **COMMON))
    return root, frozen, unfrozen


def test_unfreezing_the_last_block_lowers_the_training_loss_below_the_frozen_run(runs) -> None:
    _, frozen, unfrozen = runs
    assert len(frozen.heads[0].history) == len(unfrozen.heads[0].history) == 10  # both ran every epoch
    frozen_loss = frozen.heads[0].history[-1]["train_loss"]
    unfrozen_loss = unfrozen.heads[0].history[-1]["train_loss"]
    assert unfrozen_loss < 0.9 * frozen_loss, (unfrozen_loss, frozen_loss)
    assert unfrozen.counts == frozen.counts


def test_only_the_last_block_and_the_head_changed(runs) -> None:
    from safetensors.torch import load_file

    from vfm.models import load_model

    root, _, _ = runs
    trained = load_file(str(root / "unfrozen" / "model.safetensors"))
    base = load_model("tiny_cnn", device="cpu").state_dict()
    for key in ("conv0.weight", "bn1.bias", "conv1.weight"):  # frozen
        assert np.array_equal(trained[f"body.{key}"].numpy(), base[key].numpy()), key
    assert not np.allclose(trained["body.conv2.weight"].numpy(), base["conv2.weight"].numpy())  # trained
    meta = json.loads((root / "unfrozen" / "model.json").read_text())
    assert meta["base"] == "tiny_cnn" and meta["unfreeze"] == 1 and meta["training"]["blocks"] == 3
    assert meta["labels"][0] == "T-shirt/top" and meta["training"]["backbone_lr"] == pytest.approx(0.001)


def test_the_published_model_loads_by_name_and_predicts_as_in_the_run(runs, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from vfm.finetune.data import open_dataset
    from vfm.finetune.splits import make_splits
    from vfm.models import get_spec, load_model

    root, _, unfrozen = runs
    monkeypatch.setenv("VFM_MODELS_DIR", str(tmp_path / "models"))
    assert main(["finetune", "publish", str(root / "unfrozen"), "--name", "fashion_tiny_ft"]) == 0
    assert "as model fashion_tiny_ft" in capsys.readouterr().out
    assert (tmp_path / "models" / "fashion_tiny_ft" / "model.json").is_file()
    assert get_spec("fashion_tiny_ft").labels[:2] == ("T-shirt/top", "Trouser")

    # The run's test split, classified by the model loaded by name: the run's test accuracy again.
    data = open_dataset(FASHION)
    test = make_splits(data, (0.8, 0.1, 0.1), 0, 300).test
    runner = load_model("fashion_tiny_ft", device="cpu")
    images = [data.source.load(int(i)) for i in test]
    top = np.array([c.top[0].index for c in runner.classify(images, top_k=1)])
    assert np.mean(top == data.labels[test]) == pytest.approx(unfrozen.evaluation.accuracy)

    # `vfm predict NAME` (a fresh command, same process) gives the runner's answers.
    Image.fromarray(images[0]).save(tmp_path / "item.png")
    assert main(["predict", "fashion_tiny_ft", str(tmp_path / "item.png"), "--top-k", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]["predictions"]
    expected = runner.classify([np.asarray(Image.open(tmp_path / "item.png").convert("RGB"))], top_k=2)[0].top
    assert [p["label"] for p in answer] == [t.label for t in expected]
    assert np.allclose([p["score"] for p in answer], [t.score for t in expected], atol=1e-6)


def test_finetune_eval_scores_the_unfreeze_run_as_its_model_does(runs, eval_agrees_with_the_model) -> None:
    eval_agrees_with_the_model(runs[2].out)


def test_the_onnx_export_of_a_published_model_matches_pytorch(runs, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vfm.finetune.data import open_dataset
    from vfm.models import load_model

    root, _, _ = runs
    monkeypatch.setenv("VFM_MODELS_DIR", str(tmp_path / "models"))
    assert main(["finetune", "publish", str(root / "unfrozen"), "--name", "fashion_tiny_onnx"]) == 0
    assert main(["export", "fashion_tiny_onnx", "--out", str(tmp_path / "repo")]) == 0
    data = open_dataset(FASHION)
    images = [data.source.load(i) for i in range(8)]
    on_torch = load_model("fashion_tiny_onnx", device="cpu")
    on_onnx = load_model("fashion_tiny_onnx", backend="onnx", device="cpu", repository=tmp_path / "repo")
    features, logits = on_torch.features_and_logits(images)
    features_onnx, logits_onnx = on_onnx.features_and_logits(images)
    assert np.allclose(logits_onnx, logits, atol=1e-4) and np.allclose(features_onnx, features, atol=1e-4)
    assert [c.top[0].label for c in on_onnx.classify(images, 1)] == [c.top[0].label for c in on_torch.classify(images, 1)]


def test_a_published_model_is_listed_without_importing_torch(runs, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    root, _, _ = runs
    monkeypatch.setenv("VFM_MODELS_DIR", str(tmp_path / "models"))
    assert main(["finetune", "publish", str(root / "unfrozen"), "--name", "fashion_listed"]) == 0
    env = dict(os.environ)
    probe = ("import json, sys\nfrom vfm.cli import main\nmain(['models', 'list', 'fashion*'])\n"
             "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'onnxruntime') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["NAME", "TASKS"]        # the table's header
    assert lines[1].startswith("fashion_listed") and json.loads(lines[-1]) == []


@pytest.mark.parametrize("argv, message", [
    (["--unfreeze", "4"], "--unfreeze 4: tiny_cnn has 3 conv layers; give at most 3."),
    (["--unfreeze", "0"], "--unfreeze must be >= 1"),
    (["--backbone-lr", "0.1"], "--backbone-lr needs --unfreeze N"),
    (["--augment"], "--augment needs --unfreeze N"),
    (["--unfreeze", "1", "--head", "knn"], "--unfreeze trains the blocks with the head by sgd"),
    (["--unfreeze", "1", "--optimizer", "gd"], "--unfreeze trains the blocks with the head by sgd"),
    (["--unfreeze", "1", "--weight-decay", "0,0.001"], "--unfreeze trains with one --weight-decay"),
    (["--views", "2"], "--views needs --unfreeze N"),
    (["--label-smoothing", "0.1"], "--label-smoothing needs --unfreeze N"),
    (["--batch-norm", "train"], "--batch-norm needs --unfreeze N"),
    (["--unfreeze", "1", "--views", "8"], "--views must be <= 7, got 8"),
    (["--unfreeze", "1", "--views", "-1"], "--views must be >= 0, got -1"),
    (["--unfreeze", "1", "--views", "two"], "--views"),
    (["--unfreeze", "1", "--views", "2", "--augment"], "--views caches fixed augmented views; --augment draws"),
    (["--unfreeze", "1", "--label-smoothing", "1"], "--label-smoothing must be < 1, got 1"),
    (["--unfreeze", "1", "--batch-norm", "running"], "--batch-norm 'running': use one of frozen, train"),
    (["--head-epochs", "3"], "--head-epochs needs --unfreeze N"),
    (["--unfreeze", "1", "--head-epochs", "-1"], "--head-epochs must be >= 0, got -1"),
    (["--mixup", "0.2"], "--mixup needs --unfreeze N"),
    (["--unfreeze", "1", "--mixup", "-1"], "--mixup must be >= 0, got -1"),
    (["--unfreeze", "1", "--mixup", "nan"], "--mixup"),
    (["--unfreeze", "1", "--backend", "onnx"], "--backend does not apply with --unfreeze (the blocks train on PyTorch)"),
])
def test_bad_unfreeze_flags_are_one_line_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", "train", "--backbone", "tiny_cnn", "--data", FASHION, "--limit", "100",
                 "--out", str(tmp_path / "run"), "--quiet", "--no-cache", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_backbone_without_known_blocks_is_refused_in_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", "train", "--backbone", "tiny_vit", "--data", FASHION, "--limit", "100", "--unfreeze",
                 "1", "--out", str(tmp_path / "run"), "--quiet", "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tiny_vit" in err


def test_publishing_under_a_zoo_name_is_refused(runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _, _ = runs
    code = main(["finetune", "publish", str(root / "unfrozen"), "--to", str(tmp_path), "--name", "tiny_cnn"])
    assert code == 2 and "zoo model" in capsys.readouterr().err
    assert not (tmp_path / "tiny_cnn").exists()


def test_config_refuses_unfreeze_flags_without_unfreeze() -> None:
    with pytest.raises(ConfigError, match="--augment needs --unfreeze N"):
        TrainConfig("tiny_cnn", FASHION, augment=True)


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_lite0"])
def test_the_frozen_part_then_the_trainable_part_is_the_backbone(name: str) -> None:
    import torch

    from vfm.models import load_model
    from vfm.models.blocks import chain_of

    runner = load_model(name, device="cpu", weights="random")
    body = runner.network.module.body
    size = runner.spec.preprocess.size
    x = torch.randn(2, 3, size, size)
    chain = chain_of(name, body)
    with torch.no_grad():
        whole = body(x)
        for n in (1, chain.count):
            frozen, trainable = chain.split(n)
            assert torch.equal(trainable(frozen(x)), whole)


def test_augment_runs_the_whole_backbone_and_still_writes_a_model(tmp_path: Path) -> None:
    import torch

    from vfm.finetune.unfreeze import _augment, unfreeze_run

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = _augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    summary = unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / "run", unfreeze=2, augment=True,
                                       head="linear", lrs="0.01", epochs=2, limit=100,
                                       features=_features(tmp_path / "cache")))
    assert len(summary.heads[0].history) == 2 and (tmp_path / "run" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["training"]["augment"] is True and meta["unfreeze"] == 2


def test_views_are_flips_and_shifts_of_the_image() -> None:
    import torch

    from vfm.finetune.unfreeze import VIEWS, describe_view, view_of

    x = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).view(2, 3, 20, 20)
    assert torch.equal(view_of(x, 1), x.flip(-1)) and describe_view(1) == "flipped"
    assert VIEWS[1] == (False, 1, -1) and describe_view(2) == "shifted down 10% and left 10%"
    moved = view_of(x, 2)  # moved down and left by 2 px (a tenth of 20)
    assert moved.shape == x.shape and torch.equal(moved[:, :, 2:, :-2], x[:, :, :-2, 2:])
    assert len({tuple(view_of(x, v).flatten().tolist()) for v in range(1, len(VIEWS) + 1)}) == len(VIEWS)


def test_views_are_extracted_once_cached_and_recorded(tmp_path: Path) -> None:
    from vfm.finetune.unfreeze import unfreeze_run

    def run(name: str, views: int):
        return unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / name, unfreeze=1, views=views,
                                        head="linear", lrs="0.01", epochs=2, limit=100, seed=0,
                                        features=_features(tmp_path / "cache")))

    first = run("a", 2)
    entries = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["tiny_cnn-frozen-but-1", "tiny_cnn-frozen-but-1-view1", "tiny_cnn-frozen-but-1-view2"]
    stats = json.loads((tmp_path / "a" / "run.json").read_text())["view_extraction"]
    assert [v["computed"] for v in stats] == [first.counts["train"]] * 2
    run("b", 2)  # the same views again: every activation from the cache
    stats = json.loads((tmp_path / "b" / "run.json").read_text())["view_extraction"]
    assert [(v["cached"], v["computed"]) for v in stats] == [(first.counts["train"], 0)] * 2
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["training"]["views"] == ["flipped", "shifted down 10% and left 10%"]
    # The views change what the blocks see: the run without them, from the same start, trains differently.
    plain = run("c", 0)
    assert plain.heads[0].history[-1]["train_loss"] != first.heads[0].history[-1]["train_loss"]


def test_batch_norm_train_moves_the_running_statistics_and_frozen_keeps_them(runs, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vfm.finetune.unfreeze import unfreeze_run
    from vfm.models import load_model

    base = load_model("tiny_cnn", device="cpu").state_dict()
    unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / "bn", unfreeze=1, batch_norm="train",
                             features=_features(tmp_path / "cache"), **COMMON))
    trained = load_file(str(tmp_path / "bn" / "model.safetensors"))
    assert not np.allclose(trained["body.bn2.running_mean"].numpy(), base["bn2.running_mean"].numpy())
    assert np.array_equal(trained["body.bn1.running_mean"].numpy(), base["bn1.running_mean"].numpy())  # frozen part
    root, _, _ = runs  # the default, frozen: the trained block keeps the pre-trained statistics
    frozen = load_file(str(root / "unfrozen" / "model.safetensors"))
    assert np.array_equal(frozen["body.bn2.running_mean"].numpy(), base["bn2.running_mean"].numpy())
    meta = json.loads((tmp_path / "bn" / "model.json").read_text())
    assert meta["training"]["batch_norm"] == "batch statistics in training"


def test_label_smoothing_raises_the_training_loss_of_the_same_run(runs, tmp_path: Path) -> None:
    from vfm.finetune.unfreeze import unfreeze_run

    _, _, plain = runs
    smoothed = unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / "smooth", unfreeze=1,
                                        label_smoothing=0.3, features=_features(tmp_path / "cache"), **COMMON))
    # Smoothed targets keep the ce loss from falling as the plain run's does.
    assert smoothed.heads[0].history[-1]["train_loss"] > plain.heads[0].history[-1]["train_loss"] + 0.1
    meta = json.loads((tmp_path / "smooth" / "model.json").read_text())
    assert meta["training"]["label_smoothing"] == pytest.approx(0.3)


def test_mixup_mixes_the_blocks_inputs_and_labels_and_is_recorded(runs, tmp_path: Path) -> None:
    """Manifold mixup: targets that are mixes of two classes cannot be fitted as the plain ones are, so the same run
    with --mixup ends at a higher training loss; the model and the report say it was used."""
    from vfm.finetune.unfreeze import unfreeze_run

    _, _, plain = runs
    mixed = unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / "mix", unfreeze=1, mixup=0.4,
                                     features=_features(tmp_path / "cache"), **COMMON))
    assert mixed.heads[0].history[-1]["train_loss"] > plain.heads[0].history[-1]["train_loss"] + 0.1
    meta = json.loads((tmp_path / "mix" / "model.json").read_text())
    assert meta["training"]["mixup"] == pytest.approx(0.4)
    assert "mixup of the blocks' inputs, Beta(0.4, 0.4)" in (tmp_path / "mix" / "report.md").read_text()


def test_head_epochs_start_the_blocks_under_a_fitted_head(runs, tmp_path: Path) -> None:
    """LP-FT: after the head alone has trained on the pre-trained features, the first epoch with the blocks starts
    from a head that already fits, so its training loss is far below that of the run whose head starts random."""
    from vfm.finetune.unfreeze import unfreeze_run

    _, _, plain = runs
    warmed = unfreeze_run(TrainConfig("tiny_cnn", FASHION, out=tmp_path / "warm", unfreeze=1, head_epochs=10,
                                      features=_features(tmp_path / "cache"), **COMMON))
    assert warmed.heads[0].history[0]["train_loss"] < plain.heads[0].history[0]["train_loss"] - 0.1
    meta = json.loads((tmp_path / "warm" / "model.json").read_text())
    assert meta["training"]["head_epochs"] == 10
    assert "the head alone 10 epochs first" in (tmp_path / "warm" / "report.md").read_text()


def test_a_rate_that_collapses_the_model_to_one_class_is_reported_and_not_chosen(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]):
    """0.03 leaves the loss finite but the model answering one class (seen on efficientnet_lite0 with a linear head
    at 0.03 too): it is marked collapsed, and the run keeps the rate that learned."""
    out = tmp_path / "run"
    assert main(["finetune", "train", "--backbone", "tiny_cnn", "--data", FASHION, "--limit", "300", "--quiet",
                 "--no-cache", "--unfreeze", "1", "--unpooled", "0", "--head", "linear", "--lr", "0.01,0.03",
                 "--epochs", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(collapsed: it answers one class for every validation image; try a smaller --lr" in printed
    run = json.loads((out / "run.json").read_text())
    stopped = {h["name"].split("_")[3]: h["stopped"] for h in run["heads"]}
    assert stopped["lr0.03"] == "collapsed" and stopped["lr0.01"] != "collapsed"
    assert "_lr0.01_" in run["chosen"]


def test_when_every_rate_collapses_no_model_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["finetune", "train", "--backbone", "tiny_cnn", "--data", FASHION, "--limit", "300", "--quiet",
                 "--no-cache", "--unfreeze", "1", "--head", "mlp", "--lr", "1,3", "--epochs", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "every run collapsed" in err, err
    assert not (out / "model.json").exists()

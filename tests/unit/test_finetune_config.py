"""finetune/config.py: one config per command holds the defaults and checks itself, from Python as from the CLI."""
import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from vfm.cli import main
from vfm.finetune.cli import add_eval_arguments, add_train_arguments, eval_config, train_config
from vfm.finetune.config import (ConfigError, EvalConfig, FeatureOptions, KNNSettings, TrainConfig, TrainSettings,
                                 default_of)
from vfm.models.errors import UsageError


@pytest.mark.parametrize("kwargs,argv", [
    ({"lrs": "0.1,abc"}, ["--lr", "0.1,abc"]),
    ({"lrs": (0, 0.1)}, ["--lr", "0,0.1"]),
    ({"lrs": (0.1, 0.1)}, ["--lr", "0.1,0.1"]),
    ({"head": "knn", "lrs": (0.1,)}, ["--head", "knn", "--lr", "0.1"]),
    ({"ks": (3,)}, ["--k", "3"]),
    ({"head": "knn", "metric": "manhattan"}, ["--head", "knn", "--metric", "manhattan"]),
    ({"tol": 1e-3}, ["--tol", "1e-3"]),
    ({"head": "mlp", "optimizer": "gd", "dropout": 0.2}, ["--head", "mlp", "--optimizer", "gd", "--dropout", "0.2"]),
    ({"head": "svm"}, ["--head", "svm"]),
    ({"split": (0.5, 0.5)}, ["--split", "0.5,0.5"]),
    ({"split": (0.9, 0, 0.1)}, ["--split", "0.9,0,0.1"]),
    ({"epochs": 0}, ["--epochs", "0"]),
    ({"delta": 1}, ["--delta", "1"]),
    ({"limit": 2}, ["--limit", "2"]),
    ({"resume": True, "overwrite": True}, ["--resume", "--overwrite"]),
    ({"nesterov": True, "momentum": 0}, ["--nesterov", "--momentum", "0"]),
    ({"step_epochs": 3}, ["--step-epochs", "3"]),
    ({"classes": ("d1", "d1")}, ["--classes", "d1,d1"]),
    ({"features": {"ray_actors": 2}}, ["--ray-actors", "2"]),
    ({"features": {"cache_dir": "cache", "use_cache": False}}, ["--cache-dir", "cache", "--no-cache"]),
])
def test_python_and_the_cli_refuse_with_the_same_message(kwargs, argv, capsys):
    with pytest.raises(ConfigError) as refused:
        features = FeatureOptions(**kwargs.get("features", {}))
        TrainConfig("pixels:8", "digits", features=features, **{k: v for k, v in kwargs.items() if k != "features"})
    assert isinstance(refused.value, UsageError) and isinstance(refused.value, ValueError)
    assert main(["finetune", "train", "--backbone", "pixels:8", "--data", "digits", *argv]) == 2
    assert capsys.readouterr().err == f"vfm: error: {refused.value}\n"


def test_cli_defaults_are_the_configs_defaults():
    train, evaluate = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_train_arguments(train)
    add_eval_arguments(evaluate)
    for parser, configs in ((train, (TrainConfig, FeatureOptions)), (evaluate, (EvalConfig, FeatureOptions))):
        flags = vars(parser.parse_args([]))
        for config in configs:
            for spec in dataclasses.fields(config):
                if spec.init and spec.name != "features":  # required fields (no default) are None until given
                    assert flags[spec.name] == default_of(config, spec.name, otherwise=None), spec.name

    args = train.parse_args(["--backbone", "tiny_cnn", "--data", "digits/"])
    assert train_config(args) == TrainConfig("tiny_cnn", "digits/")
    assert train_config(args).settings == TrainConfig("tiny_cnn", "digits/").settings == TrainSettings()
    args = evaluate.parse_args(["runs/digits", "--data", "digits/"])
    assert eval_config(args) == EvalConfig(Path("runs/digits"), "digits/")


def test_defaults_follow_the_head_and_optimiser():
    sgd = TrainConfig("tiny_cnn", "digits/")
    assert sgd.settings.lrs == (0.01, 0.03, 0.1, 0.3) and sgd.settings.epochs == 30 and sgd.settings.hidden == ()
    assert sgd.lrs is None and sgd.knn is None  # not given; what it came to is in settings
    assert sgd.out == Path("runs/digits-tiny_cnn-linear")
    gd = dataclasses.replace(sgd, optimizer="gd")  # replace() checks and resolves again
    assert gd.settings.lrs == (0.1, 1.0, 10.0) and gd.settings.epochs == 200 and gd.settings.optimizer == "gd"
    mlp = TrainConfig("tiny_cnn", "idx:/data/fashion", head="mlp")
    assert mlp.settings.hidden == (512, 256) and mlp.out == Path("runs/fashion-tiny_cnn-mlp")
    knn = TrainConfig("tiny_cnn", "digits/", head="knn")
    assert knn.knn == KNNSettings(ks=(5,), metric="cosine") and knn.settings is None


def test_the_lbfgs_weight_decays_are_relative_to_the_training_set_as_sklearns_c_is():
    # scikit-learn's C * sum(loss) + |w|^2 / 2 is N*C * (mean loss + wd/2 |w|^2) at wd = 1 / (N*C)
    assert TrainSettings(optimizer="lbfgs").resolve(800).weight_decay == pytest.approx((1 / 800,))  # C = 1
    s = TrainSettings(optimizer="lbfgs", cs="1,0.1,10,0.01")
    assert s.relative_decay and s.to_json()["weight_decay"] is None and s.to_json()["cs"] == [1, 0.1, 10, 0.01]
    with pytest.raises(ValueError, match="resolve"):
        s.grid()
    # strongest first, whatever order the C values came in: the path's order
    assert s.resolve(800).weight_decay == pytest.approx((1 / 8, 1 / 80, 1 / 800, 1 / 8000))  # C 0.01, 0.1, 1, 10
    assert s.resolve(50).weight_decay[2] == pytest.approx(1 / 800)  # resolved once, for the run's N
    assert [wd for _, wd in s.grid()] == list(s.weight_decay) and s.to_json()["weight_decay"] == list(s.weight_decay)
    given = TrainSettings(optimizer="lbfgs", weight_decay=(0.1, 0.01))
    assert not given.relative_decay and given.resolve(800).weight_decay == (0.1, 0.01)  # given values stay absolute
    assert TrainSettings().weight_decay == (0.0,)  # sgd: no decay unless given


def test_python_may_give_values_as_the_cli_spells_them():
    cfg = TrainConfig(" tiny_cnn ", "digits/", head="MLP", hidden="64,64", lrs="0.01,0.1", epochs="8",
                      classes="d3, d8", seed=7, features=FeatureOptions(threads=2))
    assert (cfg.backbone, cfg.head, cfg.hidden, cfg.lrs, cfg.epochs) == ("tiny_cnn", "mlp", (64, 64), (0.01, 0.1), 8)
    assert cfg.classes == ("d3", "d8")
    s = cfg.settings
    assert (s.hidden, s.lrs, s.epochs, s.seed, s.threads) == ((64, 64), (0.01, 0.1), 8, 7, 2)
    assert s.head_name(0.1) == "mlp64-64_ce_sgd_lr0.1_wd0"


def test_settings_for_train_heads_check_themselves():
    with pytest.raises(ConfigError, match="--hidden: give at least one value"):
        TrainSettings(head="mlp", hidden=())
    with pytest.raises(ConfigError, match="--hidden does not apply to --head linear"):
        TrainSettings(hidden=(32,))
    with pytest.raises(ConfigError, match="--dropout needs --optimizer sgd"):
        TrainSettings(head="mlp", optimizer="gd", dropout=0.1)
    with pytest.raises(ConfigError, match="--batch-size True is not a whole number"):
        TrainSettings(batch_size=True)
    assert TrainSettings(optimizer="gd").lrs == (0.1, 1.0, 10.0)


def test_eval_config_checks_itself_and_names_its_report_folder():
    cfg = EvalConfig("runs/digits", "idx:/data/fashion/")
    assert cfg.out == Path("runs/digits/eval-idx_data_fashion") and cfg.subset == "auto"
    with pytest.raises(ConfigError, match="--subset 'train': use one of auto, test, all"):
        EvalConfig("runs/digits", "digits/", subset="train")
    with pytest.raises(ConfigError, match="RUN is required"):
        EvalConfig("", "digits/")
    with pytest.raises(ConfigError, match="--limit must be >= 1, got 0"):
        EvalConfig("runs/digits", "digits/", limit=0)


def test_the_finetune_cli_and_its_configs_load_without_torch():
    code = ("import sys; import vfm.finetune.cli, vfm.finetune.config; from vfm.cli import build_parser; "
            "build_parser(); heavy = [m for m in ('torch', 'ray', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cs="0"), "--C must be > 0"),
    (dict(cs="x"), "--C 'x' is not a number"),
    (dict(cs="1", weight_decay="0.1"), "--C and --weight-decay both set the weight decays: give one"),
    (dict(cs="1", optimizer="sgd"), r"--C does not apply to --optimizer sgd \(it is for: lbfgs\)"),
])
def test_bad_c_values_are_refused_in_one_line(kwargs, message):
    kwargs.setdefault("optimizer", "lbfgs")
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig("tiny_cnn", "digits/", **kwargs)
    assert "\n" not in str(info.value)

"""lbfgs heads on real features: 1,000 Fashion-MNIST images (Debian's idx files) through tiny_cnn,
beside scikit-learn's LogisticRegression on the same features; the saved head standardises as
it did in training."""
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vfm.finetune.config import DEFAULT_LBFGS_CS, LBFGS_GRID_CS
from vfm.finetune.data import open_dataset
from vfm.finetune.extractors import make_extractor
from vfm.finetune.features import extract_features
from vfm.finetune.splits import make_splits
from vfm.finetune.train import TrainSettings, train_heads
from vfm.models.heads import JSON_NAME, LinearHead, load_head, save_head

FASHION = "idx:/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """tiny_cnn features of 1,000 Fashion-MNIST images, split as `vfm finetune train` splits them."""
    data = open_dataset(FASHION)
    splits = make_splits(data, (0.8, 0.1, 0.1), seed=0, limit=1000)
    union = splits.union()
    cache = tmp_path_factory.mktemp("features")
    feats = extract_features(data.source.subset(union), make_extractor("tiny_cnn", device="cpu"), cache,
                             progress=False)
    position = {int(i): p for p, i in enumerate(union)}
    x = {name: feats.features[[position[int(i)] for i in idx]] for name, idx in splits.items()}
    y = {name: data.labels[idx] for name, idx in splits.items()}
    return x, y, data.classes


def _fit(settings, x, y):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    return train_heads(settings, t["train"], torch.from_numpy(y["train"]), t["val"], torch.from_numpy(y["val"]), 10)


def test_the_linear_lbfgs_head_is_within_a_point_of_logistic_regression(fashion):
    x, y, classes = fashion
    result = _fit(TrainSettings(optimizer="lbfgs"), x, y)
    head = result.model.unstack(result.best, classes, result.mean, result.std)
    ours = float(np.mean(head.predict(x["test"]) == y["test"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x["train"], y["train"])
    theirs = float(sk.score(x["test"], y["test"]))
    assert len(y["test"]) > 100 and theirs > 0.6
    assert ours >= theirs - 0.01, (ours, theirs)
    # by default one fit, at LogisticRegression's default C = 1 (weight decay 1/N), to convergence
    n = len(y["train"])
    assert DEFAULT_LBFGS_CS == (1.0,) and [r.name for r in result.runs] == [f"linear_ce_lbfgs_wd{1 / n:g}"]
    assert result.runs[0].stopped == "converged"


def test_a_c_grid_walks_the_path_and_keeps_the_best_on_validation(fashion):
    x, y, _ = fashion
    result = _fit(TrainSettings(optimizer="lbfgs", cs=LBFGS_GRID_CS), x, y)
    # every weight decay of the grid, relative to the training set's size as scikit-learn's C is,
    # got a head fitted to convergence, and the one kept is the best on validation
    n = len(y["train"])
    assert [r.weight_decay for r in result.runs] == [pytest.approx(1 / (n * c)) for c in LBFGS_GRID_CS]
    assert result.runs[2].name == f"linear_ce_lbfgs_wd{1 / n:g}"  # C = 1, LogisticRegression's default
    assert all(r.stopped == "converged" for r in result.runs)
    best = max(r.best_val_accuracy for r in result.runs)
    assert result.runs[result.best].best_val_accuracy == best


def test_lbfgs_reaches_the_minimum_of_the_regularised_objective(fashion):
    x, y, _ = fashion
    wd = 0.01
    result = _fit(TrainSettings(optimizer="lbfgs", weight_decay=wd, tol=1e-6), x, y)
    model = result.model
    xs = (torch.from_numpy(x["train"]) - result.mean) / result.std
    loss = model.losses(model(xs), torch.from_numpy(y["train"])).sum() + 0.5 * wd * model.penalty().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-4  # the gradient vanishes (to float32 precision)


def test_a_weight_decay_grid_trains_one_sgd_head_per_pair(fashion):
    x, y, _ = fashion
    settings = TrainSettings(head="mlp", hidden=(32,), lrs=(0.01, 0.1), weight_decay=(0.0, 1e-3), epochs=3)
    result = _fit(settings, x, y)
    assert [(r.lr, r.weight_decay) for r in result.runs] == [(0.01, 0.0), (0.01, 1e-3), (0.1, 0.0), (0.1, 1e-3)]
    assert len({r.name for r in result.runs}) == 4 and result.runs[1].name.endswith("_lr0.01_wd0.001")
    # the same learning rate with and without decay: same start, different weights
    assert not torch.equal(result.model.weights[0][0], result.model.weights[0][1])


def test_the_saved_head_standardises_as_in_training(fashion, tmp_path):
    x, y, classes = fashion
    result = _fit(TrainSettings(optimizer="lbfgs", weight_decay=(0.01, 0.001)), x, y)
    head = result.model.unstack(result.best, classes, result.mean, result.std)
    save_head(head, tmp_path / "h", {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    meta = json.loads((tmp_path / "h" / JSON_NAME).read_text())
    assert meta["head"]["standardize"] is True
    loaded, _ = load_head(tmp_path / "h")
    np.testing.assert_array_equal(loaded.predict_proba(x["test"]), head.predict_proba(x["test"]))
    # the scores are those of the network on the standardised features
    xs = (torch.from_numpy(x["test"]) - result.mean) / result.std
    expected = torch.softmax(result.model(xs)[result.best], dim=1).detach().numpy()
    np.testing.assert_allclose(loaded.predict_proba(x["test"]), expected, rtol=1e-5, atol=1e-6)
    # a head.json from before the key existed loads the same head, standardising
    del meta["head"]["standardize"]
    (tmp_path / "h" / JSON_NAME).write_text(json.dumps(meta))
    old, _ = load_head(tmp_path / "h")
    np.testing.assert_array_equal(old.predict_proba(x["test"]), head.predict_proba(x["test"]))


def test_a_head_without_standardisation_saves_and_loads(tmp_path):
    head = LinearHead(["a", "b"], 3, standardize=False)
    save_head(head, tmp_path / "plain", {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    loaded, meta = load_head(tmp_path / "plain")
    assert meta["head"]["standardize"] is False and "feature_mean" not in loaded.tensors()
    feats = np.array([[1.0, -2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(feats), head.predict_proba(feats))


def test_the_closed_form_softmax_gradient_is_autograds(fashion):
    """The linear head's lbfgs objective and gradient in closed form equal autograd's on the same features."""
    from vfm.finetune.train import _SoftmaxLinear, standardisation

    x, y, _ = fashion
    xt, yt = torch.from_numpy(x["train"]), torch.from_numpy(y["train"])
    mean, std = standardisation(xt)
    xs = (xt - mean) / std
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(10, xs.shape[1], generator=gen) * 0.1).requires_grad_(True)
    b = (torch.randn(10, generator=gen) * 0.1).requires_grad_(True)
    wd = 0.01
    expected = (torch.nn.functional.cross_entropy(xs @ w.T + b, yt)
                + 0.5 * wd * (w.pow(2).sum() + b.pow(2).sum()))
    gw, gb = torch.autograd.grad(expected, [w, b])
    value, cw, cb = _SoftmaxLinear(xs, yt, 10)(w.detach(), b.detach(), wd)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(cw, gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cb, gb, rtol=1e-4, atol=1e-6)
    no_grad = _SoftmaxLinear(xs, yt, 10)(w.detach(), b.detach(), wd, grad=False)
    assert no_grad[1] is None and no_grad[0].item() == value.item()


def test_a_single_c_fit_predicts_as_logistic_regression(fashion):
    """At LogisticRegression's own C = 1 (weight decay 1/N), from zero as scikit-learn starts, the fit
    lands on scikit-learn's answers (its intercept is unpenalised, ours is: almost every test image alike)."""
    x, y, classes = fashion
    n = len(y["train"])
    result = _fit(TrainSettings(optimizer="lbfgs", weight_decay=1.0 / n), x, y)
    ours = result.model.unstack(result.best, classes, result.mean, result.std).predict(x["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x["train"], y["train"])
    assert np.mean(ours == sk.predict(x["test"])) >= 0.97
    assert result.runs[0].stopped == "converged" and result.runs[0].history[-1]["iterations"] < 200

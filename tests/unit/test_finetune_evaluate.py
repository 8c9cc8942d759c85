"""finetune/evaluate.py + report.py: metrics against scikit-learn, the bound, the report files."""
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support

from vfm.finetune.evaluate import evaluate, hoeffding_bound
from vfm.finetune.report import HeadSummary, RunReport, write_report


def test_the_bound_is_hoeffdings():
    assert hoeffding_bound(0.1, 1000, 0.05) == pytest.approx(0.1 + math.sqrt(math.log(20) / 2000))
    assert hoeffding_bound(0.1, 4000, 0.05) - 0.1 == pytest.approx((hoeffding_bound(0.1, 1000, 0.05) - 0.1) / 2)
    assert hoeffding_bound(0.1, 1000, 0.01) > hoeffding_bound(0.1, 1000, 0.05)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="delta"):
            hoeffding_bound(0.1, 100, bad)
    with pytest.raises(ValueError, match="at least one"):
        hoeffding_bound(0.1, 0, 0.05)


def test_the_bound_holds_at_least_1_minus_delta_of_the_time():
    # A classifier whose true error is 0.2, tested on 20000 independent test sets of K = 150.
    rng = np.random.default_rng(0)
    true_error, k, delta = 0.2, 150, 0.05
    errors = rng.binomial(k, true_error, size=20000) / k
    bounds = np.array([hoeffding_bound(e, k, delta) for e in errors])
    assert (true_error > bounds).mean() <= delta
    # ... and it is not vacuous: without the sqrt term it would fail about half the time
    assert (true_error > errors).mean() > 0.3


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 4, 500))
    pred[pred == 3] = 2  # class 3 is never predicted: its precision is 0, not NaN
    ev = evaluate(y, pred, ["a", "b", "c", "d"], delta=0.05)
    np.testing.assert_array_equal(ev.confusion, sk_confusion(y, pred, labels=range(4)))
    p, r, _, s = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose(ev.precision, p)
    np.testing.assert_allclose(ev.recall, r)
    np.testing.assert_array_equal(ev.support, s)
    assert ev.accuracy == pytest.approx((y == pred).mean()) and ev.k == 500
    assert ev.bound == pytest.approx(ev.error + math.sqrt(math.log(20) / 1000))


def test_bound_sentence():
    ev = evaluate(np.array([0, 1, 1, 0] * 50), np.array([0, 1, 0, 0] * 50), ["x", "y"], delta=0.05)
    assert ev.bound_sentence().startswith(f"true error <= {ev.bound:.4f} with probability >= 95%")
    assert "with probability >= 99%" in evaluate(np.zeros(5, int), np.zeros(5, int), ["x", "y"], 0.01).bound_sentence()


def test_report_has_the_bound_every_head_and_two_plots(tmp_path):
    y = np.arange(60) % 3
    ev = evaluate(y, np.where(np.arange(60) % 7 == 0, (y + 1) % 3, y), ["cat", "dog", "eel"])
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1 / e, "train_accuracy": 1 - 1 / (e + 1),
                "val_loss": 1.2 / e, "val_accuracy": 0.9 - 1 / (e + 2)} for e in range(1, 6)]
    heads = [HeadSummary("linear_ce_sgd_lr0.1_wd0", "lr 0.1", 5, 0.8, 0.3, 0.85, "", history),
             HeadSummary("linear_ce_sgd_lr0.3_wd0", "lr 0.3", 2, 0.7, 0.5, 0.75, "patience", history[:2])]
    written = write_report(tmp_path, RunReport("run x", [("backbone", "`tiny_cnn`")], heads, 0, ev))
    text = (tmp_path / "report.md").read_text()
    assert ev.bound_sentence() in text and "linear_ce_sgd_lr0.3_wd0" in text and "| dog |" in text
    for name in ("curves.png", "confusion.png"):
        assert tmp_path / name in written
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 300

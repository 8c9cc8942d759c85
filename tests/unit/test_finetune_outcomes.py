"""What `vfm finetune` says and records after training and evaluation: a diverged head is reported
as diverged, and `eval --update` puts the new metrics where the service reads them."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vfm.cli import main
from vfm.models.heads import load_head
from vfm.service.heads import HeadCatalog


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """300 digits as PNG files to train on, and 100 more as a second data set."""
    x, y = load_digits(return_X_y=True)
    root = tmp_path_factory.mktemp("digits")
    for i in range(400):
        folder = root / ("train" if i < 300 else "later") / f"d{y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i] * 255 / 16).astype(np.uint8).reshape(8, 8)).save(folder / f"{i}.png")
    return root


def train(args, data, out, cache):
    return main(["finetune", "train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet",
                 "--device", "cpu", "--backbone", "pixels:8", *args])


def test_a_diverged_learning_rate_is_reported_as_diverged(digits, tmp_path, capsys):
    assert train(["--head", "linear", "--lr", "0.1,1e38", "--epochs", "3"], digits / "train", tmp_path / "run",
                 tmp_path / "cache") == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if "lr1e+38" in text)
    assert "diverged at epoch 1" in line and "-1.0000" not in line and "val" not in line.split("lr1e+38")[1]
    assert "try a smaller --lr" in line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    diverged = next(h for h in run["heads"] if h["name"].endswith("lr1e+38_wd0"))
    assert diverged["val_accuracy"] is None and diverged["test_accuracy"] is None and diverged["stopped"] == "diverged"
    assert run["chosen"].endswith("lr0.1_wd0")
    report = (tmp_path / "run" / "report.md").read_text()
    row = next(text for text in report.splitlines() if "lr1e+38" in text)
    assert "-1.0000" not in row and "| - | - | - | - | diverged |" in row


def test_a_diverged_lbfgs_fit_names_its_own_remedy() -> None:
    """lbfgs has no --lr: a fit whose loss became infinite is told to use a larger weight decay."""
    from vfm.finetune.cli import head_outcome
    from vfm.finetune.report import HeadSummary

    line = head_outcome(HeadSummary("linear_ce_lbfgs_wd3.7e-05", "wd 3.7e-05", None, None, None, None, "diverged",
                                    [{}]))
    assert line == "diverged at epoch 1 (its loss became infinite; try a larger weight decay (a smaller --C))"


def test_an_lbfgs_fit_that_starts_at_its_solution_is_scored_not_called_diverged(digits, tmp_path, capsys):
    """Each C starts from the previous one's solution; when that already meets the gradient tolerance the fit runs
    no iteration, converged at its start. It was once reported "diverged at epoch 1 (its loss became infinite)"."""
    assert train(["--head", "linear", "--optimizer", "lbfgs", "--C", "1,1.00001"], digits / "train", tmp_path / "run",
                 tmp_path / "cache") == 0
    lines = [text for text in capsys.readouterr().out.splitlines() if text.lstrip(" *").startswith("linear_ce_lbfgs")]
    assert len(lines) == 2 and all("diverged" not in text and "val " in text for text in lines), lines
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    second = run["heads"][1]
    assert second["stopped"] == "converged" and second["best_epoch"] == 0 and second["val_accuracy"] is not None
    assert second["history"][-1]["iterations"] == 0 and np.isfinite(second["history"][-1]["train_loss"])


def test_eval_update_records_the_new_metrics_where_the_service_reads_them(digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(["--head", "linear", "--lr", "0.1", "--epochs", "5"], digits / "train", run, tmp_path / "cache") == 0
    _, before = load_head(run)
    assert main(["finetune", "eval", str(run), "--data", str(digits / "later"), "--quiet", "--cache-dir",
                 str(tmp_path / "cache")]) == 0
    assert load_head(run)[1] == before  # without --update head.json is left alone
    assert main(["finetune", "eval", str(run), "--data", str(digits / "later"), "--update", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "metrics recorded in" in capsys.readouterr().out
    evaluation = json.loads(next(run.glob("eval-*/eval.json")).read_text())["test"]
    _, after = load_head(run)
    m = after["metrics"]
    assert m["test_k"] == evaluation["k"] == 100 != before["metrics"]["test_k"]
    assert m["test_accuracy"] == evaluation["accuracy"] and m["bound"] == evaluation["bound_sentence"]
    assert m["evaluated_on"]["data"] == str(digits / "later") and m["evaluated_on"]["subset"] == "all"
    assert m["val_accuracy"] == before["metrics"]["val_accuracy"]
    assert after["training_metrics"] == before["metrics"]
    # published, then listed by the service's catalog with the later evaluation's metrics
    assert main(["finetune", "publish", str(run), "--to", str(tmp_path / "heads"), "--name", "digits"]) == 0
    catalog = HeadCatalog(tmp_path / "heads")
    catalog.reload()
    listed = next(h for h in catalog.list() if h["name"] == "digits")
    assert listed["status"] == "ready" and listed["metrics"]["test_k"] == 100
    # a second update keeps the training run's metrics as they were
    assert main(["finetune", "eval", str(run), "--data", str(digits / "later"), "--update", "--limit", "50",
                 "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    _, again = load_head(run)
    assert again["metrics"]["test_k"] == 50 and again["training_metrics"] == before["metrics"]


def test_an_lbfgs_run_names_its_weight_decays(digits, tmp_path, capsys):
    assert train(["--head", "linear", "--optimizer", "lbfgs", "--weight-decay", "0.1,0.001"], digits / "train",
                 tmp_path / "run", tmp_path / "cache") == 0
    out = capsys.readouterr().out
    assert "linear_ce_lbfgs_wd0.1 " in out and "linear_ce_lbfgs_wd0.001 " in out
    _, meta = load_head(tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [h["setting"] for h in run["heads"]] == ["wd 0.1", "wd 0.001"]
    assert meta["training"]["optimizer"] == "lbfgs" and meta["training"]["weight_decay"] == [0.1, 0.001]
    assert meta["training"]["chosen_weight_decay"] == {"linear_ce_lbfgs_wd0.1": 0.1,
                                                       "linear_ce_lbfgs_wd0.001": 0.001}[run["chosen"]]
    assert meta["metrics"]["test_accuracy"] > 0.8
    assert "lbfgs (full batch" in (tmp_path / "run" / "report.md").read_text()

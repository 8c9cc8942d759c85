"""Fixtures shared by unit test modules."""
from __future__ import annotations

import pytest


@pytest.fixture
def forget_published_models():
    """Models a test publishes are registered in this process; unregister them after it (use it per module with
    ``pytestmark = pytest.mark.usefixtures("forget_published_models")``)."""
    from vfm.models import list_models, published
    from vfm.models.registry import unregister

    before = set(list_models())
    yield
    for name in set(list_models()) - before:
        unregister(name)
        published._published.pop(name, None)


@pytest.fixture
def eval_agrees_with_the_model(tmp_path, capsys):
    """A check: `vfm finetune eval RUN --update` of a model run (--unfreeze / --unpooled) on a manifest of 40 real
    Fashion-MNIST test images (PNG files) scores what the model itself (built from RUN as the service builds it) scores on them,
    writes its report and records the metrics in RUN/model.json, the training's kept as training_metrics."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from vfm.cli import main
    from vfm.finetune.data import open_dataset
    from vfm.models.published import build_published, published_spec

    def check(run):
        data = open_dataset("idx:/usr/share/datasets/fashion-mnist")
        test = np.flatnonzero(data.given_split == 2)[:40]
        folder = tmp_path / "images"
        folder.mkdir()
        rows = ["path,label"]
        for i in test:
            Image.fromarray(data.source.load(int(i))).save(folder / f"{i}.png")
            rows.append(f"{i}.png,{data.classes[data.labels[i]]}")
        manifest = folder / "manifest.csv"
        manifest.write_text("\n".join(rows) + "\n")
        copy = tmp_path / "run"
        shutil.copytree(run, copy)
        before = json.loads((copy / "model.json").read_text())["metrics"]
        assert main(["finetune", "eval", str(copy), "--data", str(manifest), "--device", "cpu", "--no-cache",
                     "--quiet", "--update"]) == 0
        printed = capsys.readouterr().out
        model = build_published(published_spec(copy), copy, "cpu")
        answers = model.classify([np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in test], top_k=1)
        expected = float(np.mean([a.top[0].label == data.classes[data.labels[i]] for a, i in zip(answers, test)]))
        assert f"accuracy {expected:.4f} on 40 examples" in printed, printed
        meta = json.loads((copy / "model.json").read_text())
        assert meta["metrics"]["test_accuracy"] == pytest.approx(expected)
        assert meta["metrics"]["evaluated_on"]["data"] == str(manifest)
        assert meta["training_metrics"]["test_accuracy"] == before["test_accuracy"]
        assert len(list(copy.glob("eval-*/report.md"))) == 1
        # the same answers, not only as many right: eval.json's confusion matrix is the model's
        labels = list(meta["labels"])
        confusion = np.zeros((len(labels), len(labels)), int)
        for a, i in zip(answers, test):
            confusion[labels.index(data.classes[data.labels[i]]), labels.index(a.top[0].label)] += 1
        (report,) = copy.glob("eval-*/eval.json")
        assert json.loads(report.read_text())["test"]["confusion"] == confusion.tolist()
        return expected

    return check

"""Models made by `vfm finetune train --unfreeze 1` (the last block trained with a head) and `--unpooled 1` (a head on
the unpooled activations entering the last block) and published into the service's models folder (config key
``models_dir``) are served by name like any zoo model, with the answers `vfm predict` gives in-process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vfm.service.client import VfmClient

FASHION = Path("/usr/share/datasets/fashion-mnist")
MODEL = "fashion_tiny_unfrozen"
UNPOOLED = "fashion_tiny_unpooled"
SERVICE_MODELS = {MODEL: {"num_cpus": 0.1, "max_batch_size": 4}, UNPOOLED: {"num_cpus": 0.1, "max_batch_size": 4}}


def SERVICE_SETUP(folder: Path) -> dict[str, Any]:
    """Before the app starts: train tiny_cnn's last block + a linear head on 200 Fashion-MNIST images (a few
    seconds) and publish it into ``folder/models``, the session's ``models_dir``."""
    from vfm.cli import main

    run, models = folder / "run", folder / "models"
    assert main(["finetune", "train", "--backbone", "tiny_cnn", "--data", f"idx:{FASHION}", "--limit", "200",
                 "--unfreeze", "1", "--lr", "0.01", "--epochs", "3", "--out", str(run), "--no-cache",
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["finetune", "publish", str(run), "--to", str(models), "--name", MODEL]) == 0
    assert main(["finetune", "train", "--backbone", "tiny_cnn", "--data", f"idx:{FASHION}", "--limit", "200",
                 "--unpooled", "1", "--head", "linear", "--optimizer", "lbfgs", "--out", str(folder / "unpooled"),
                 "--no-cache", "--device", "cpu", "--quiet"]) == 0
    assert main(["finetune", "publish", str(folder / "unpooled"), "--to", str(models), "--name", UNPOOLED]) == 0
    return {"models_dir": str(models)}


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image

    from vfm.finetune.data import read_idx_file

    folder = tmp_path_factory.mktemp("fashion")
    paths = []
    for i, grey in enumerate(read_idx_file(next(FASHION.glob("t10k-images*")))[:5]):
        paths.append(folder / f"item{i}.png")
        Image.fromarray(grey).save(paths[-1])
    return paths


@pytest.mark.parametrize("model", [MODEL, UNPOOLED])
def test_the_published_model_is_listed_with_its_own_labels(client: VfmClient, model: str) -> None:
    info = client.model(model)
    assert info["status"] == "ready" and info["task"] == "classify"
    assert info["labels"][:3] == ["T-shirt/top", "Trouser", "Pullover"]


@pytest.mark.parametrize("model", [MODEL, UNPOOLED])
def test_http_answers_equal_vfm_predict_in_process(client: VfmClient, service_url: str, fashion_pngs: list[Path],
                                                   capsys: pytest.CaptureFixture[str], model: str) -> None:
    from vfm.cli import main

    files = [str(p) for p in fashion_pngs]
    assert main(["predict", model, *files, "--top-k", "3", "--json", "--device", "cpu"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["predict", "--url", service_url, model, *files, "--top-k", "3", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert len(local) == len(remote) == len(files)
    for here, there, path in zip(local, remote, fashion_pngs):
        assert [p["label"] for p in here["predictions"]] == [p["label"] for p in there["predictions"]]
        assert np.allclose([p["score"] for p in here["predictions"]], [p["score"] for p in there["predictions"]],
                           atol=1e-5)
        answer = client.predict(model, path.read_bytes(), top_k=3)["predictions"]
        assert [p["label"] for p in answer] == [p["label"] for p in here["predictions"]]


def test_the_unpooled_model_embeds_its_flattened_activations(client: VfmClient, fashion_pngs: list[Path]) -> None:
    """/embed of an --unpooled model is what its head takes: the activations entering tiny_cnn's last block, flattened
    (the same numbers as in-process)."""
    from PIL import Image

    from vfm.models import get_spec, load_model

    dim = get_spec(UNPOOLED).feature_dim
    answer = client.embed(UNPOOLED, fashion_pngs[0].read_bytes())
    remote = np.asarray(answer["embedding"], np.float32)
    local = load_model(UNPOOLED, device="cpu").embed([np.asarray(Image.open(fashion_pngs[0]).convert("RGB"))])[0]
    assert remote.shape == (dim,) and answer["dim"] == dim > 1000
    assert np.allclose(remote, local, atol=1e-4)

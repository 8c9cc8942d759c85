"""Fine-tuning on real data with a real backbone: Fashion-MNIST (Debian's package) on
efficientnet_lite0 features (ImageNet weights from a pip package), a 700-image subset."""
import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from vfm.finetune.data import open_dataset
from vfm.finetune.extractors import make_extractor
from vfm.finetune.features import extract_features
from vfm.finetune.splits import make_splits
from vfm.models import load_model
from vfm.models.heads import KNNHead, load_head
from vfm.cli import main

pytestmark = pytest.mark.e2e

FASHION = "idx:/usr/share/datasets/fashion-mnist"
LIMIT, SEED = "700", "0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    common = ["--data", FASHION, "--limit", LIMIT, "--seed", SEED, "--cache-dir", str(root / "cache"), "--quiet",
              "--device", "cpu"]
    # default heads and training: mlp 512,256 and linear, sgd, lr 0.01,0.03,0.1,0.3, 30 epochs
    assert main(["finetune", "train", "--backbone", "efficientnet_lite0", "--head", "mlp",
                 "--out", str(root / "mlp"), *common]) == 0
    assert main(["finetune", "train", "--backbone", "pixels", "--head", "linear",
                 "--out", str(root / "pixels"), *common]) == 0
    return root


def _run(folder):
    return json.loads((folder / "run.json").read_text())


def test_mlp_on_backbone_features_beats_linear_on_raw_pixels(runs):
    mlp, pixels = _run(runs / "mlp"), _run(runs / "pixels")
    # the same examples in every split: same data, seed and limit give the same fingerprint
    assert mlp["data_fingerprint"] == pixels["data_fingerprint"] and mlp["counts"]["test"] == 100
    assert mlp["test"]["accuracy"] > pixels["test"]["accuracy"] + 0.03
    assert mlp["test"]["accuracy"] > 0.75


def test_the_report_carries_the_bound(runs):
    _, meta = load_head(runs / "mlp")
    m = meta["metrics"]
    assert m["test_error_bound"] == pytest.approx(m["test_error"] + math.sqrt(math.log(1 / 0.05) / (2 * m["test_k"])))
    report = (runs / "mlp" / "report.md").read_text()
    assert f"true error <= {m['test_error_bound']:.4f} with probability >= 95%" in report
    assert meta["backbone"] == "efficientnet_lite0" and meta["feature_dim"] == 1280
    assert meta["labels"][0] == "T-shirt/top" and meta["weights_sha256"]


def test_cached_features_skip_the_backbone_and_knn_1_is_the_nearest(runs):
    data = open_dataset(FASHION)
    splits = make_splits(data, (0.8, 0.1, 0.1), seed=int(SEED), limit=int(LIMIT))
    extractor = make_extractor("efficientnet_lite0", device="cpu")
    union = splits.union()
    feats = extract_features(data.source.subset(union), extractor, runs / "cache", progress=False)
    assert feats.stats.cached == len(union) and not extractor.loaded  # the model was never even built
    pos = {int(i): p for p, i in enumerate(union)}
    train = feats.features[[pos[int(i)] for i in splits.train]]
    test = feats.features[[pos[int(i)] for i in splits.test]]
    head = KNNHead(data.classes, train, data.labels[splits.train], k=1, metric="l2")
    d = cdist(test.astype(np.float64), train.astype(np.float64), "sqeuclidean")
    np.testing.assert_array_equal(head.predict(test), data.labels[splits.train][d.argmin(axis=1)])


def test_a_published_head_classifies_raw_images_like_the_service_will(runs, tmp_path):
    assert main(["finetune", "publish", str(runs / "mlp"), "--to", str(tmp_path / "heads"), "--name", "fashion"]) == 0
    head, meta = load_head(tmp_path / "heads" / "fashion")
    data = open_dataset(FASHION)
    test = np.flatnonzero(data.given_split == 2)[:40]
    runner = load_model(meta["backbone"], device="cpu")
    features = runner.embed([data.source.load(int(i)) for i in test], normalize=meta["embed"]["normalize"])
    out = head.classify(features, top_k=2)
    accuracy = np.mean([c.top[0].label == data.classes[data.labels[i]] for c, i in zip(out, test)])
    assert accuracy > 0.7 and all(len(c.top) == 2 for c in out)


def test_eval_re_evaluates_the_pixel_head_on_the_t10k_split(runs, capsys):
    assert main(["finetune", "eval", str(runs / "pixels"), "--data", FASHION, "--limit", "500", "--quiet",
                 "--cache-dir", str(runs / "cache")]) == 0
    result = json.loads(next((runs / "pixels").glob("eval-*/eval.json")).read_text())
    assert result["subset"] == "test" and result["test"]["k"] == 500 and result["test"]["accuracy"] > 0.6
    assert "true error <=" in capsys.readouterr().out


def test_the_streamed_extraction_gives_the_features_of_embed(tmp_path):
    # DataLoader workers resize, the network runs channels-last on the batch: embed()'s features all the same
    data = open_dataset(FASHION)
    test = np.flatnonzero(data.given_split == 2)[:48]
    source = data.source.subset(test)
    feats = extract_features(source, make_extractor("efficientnet_lite0", device="cpu"), tmp_path, batch_size=16,
                             progress=False, workers=1)
    runner = load_model("efficientnet_lite0", device="cpu")
    old = runner.embed([source.load(i) for i in range(len(source))])
    assert feats.valid.all()
    np.testing.assert_allclose(feats.features, old, rtol=1e-4, atol=1e-4)

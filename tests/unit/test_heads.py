"""models/heads.py: the heads the service runs, and the head folder format it loads."""
import json
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits

from vfm.models.heads import InvalidHead, KNNHead, LinearHead, MLPHead, load_head, save_head

META = {"backbone": "tiny_cnn", "embed": {"normalize": False}}
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    x, y = digits
    head = MLPHead(DIGITS, 64, hidden=(32,), dropout=0.2, loss="ce")
    torch.manual_seed(0)
    head.feature_mean.copy_(torch.from_numpy(x.mean(0)))
    head.feature_std.copy_(torch.from_numpy(x.std(0).clip(1e-6)))
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    head.train()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return head.eval()


@pytest.mark.parametrize("kind", ["linear", "mlp", "knn"])
def test_save_and_load_give_the_same_predictions(tmp_path, digits, trained_mlp, kind):
    x, y = digits
    if kind == "knn":
        head = KNNHead(DIGITS, x[:1500], y[:1500], k=3, metric="l2")
    elif kind == "mlp":
        head = trained_mlp
    else:
        head = LinearHead(DIGITS, 64, loss="ce")
    save_head(head, tmp_path / "h", {**META, "metrics": {"test_accuracy": np.float64(0.5)}})
    loaded, meta = load_head(tmp_path / "h")
    assert type(loaded) is type(head) and meta["head"]["type"] == kind and meta["labels"] == DIGITS
    np.testing.assert_array_equal(loaded.predict_proba(x[1500:]), head.predict_proba(x[1500:]))
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]


def test_a_trained_mlp_head_classifies_with_sorted_top_k(digits, trained_mlp):
    x, y = digits
    head = trained_mlp
    assert (head.predict(x) == y).mean() > 0.95  # fitted on these: it must have learned them
    out = head.classify(x[:5], top_k=3)
    assert [len(c.top) for c in out] == [3] * 5
    for c, label in zip(out, y[:5]):
        scores = [t.score for t in c.top]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
        assert c.top[0].label == DIGITS[label] and c.to_json()["predictions"][0]["index"] == label


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_with_k1_returns_the_label_of_the_nearest_training_example(digits, metric):
    x, y = digits
    rng = np.random.default_rng(0)
    train, query = x[:1200], x[1200:] + rng.normal(0, 0.5, x[1200:].shape).astype(np.float32)
    labels = rng.integers(0, 10, 1200)  # random labels: only "nearest" can explain a match
    head = KNNHead(DIGITS, train, labels, k=1, metric=metric)
    a, b = query.astype(np.float64), train.astype(np.float64)
    if metric == "cosine":
        nearest = np.argmax((a / np.linalg.norm(a, axis=1, keepdims=True)) @
                            (b / np.linalg.norm(b, axis=1, keepdims=True)).T, axis=1)
    else:
        nearest = np.argmin(cdist(a, b, "sqeuclidean"), axis=1)  # exact differences, float64
    np.testing.assert_array_equal(head.predict(query), labels[nearest])
    np.testing.assert_array_equal(head.predict_proba(query).max(axis=1), 1.0)


def test_knn_votes_and_breaks_ties_towards_the_nearest_class():
    train = np.array([[0.0], [1.0], [1.1], [5.0], [5.2]], np.float32)
    labels = np.array([0, 1, 1, 2, 2])
    head = KNNHead(["a", "b", "c"], train, labels, k=3, metric="l2")
    np.testing.assert_allclose(head.predict_proba(np.array([[0.9]], np.float32)), [[1 / 3, 2 / 3, 0]])
    two = KNNHead(["a", "b", "c"], train, labels, k=2, metric="l2")
    # 4.4: nearest 5.0 (c) then 5.2 (c) -> c; 0.6: 1.0 (b) then 0.0 (a): a 1-1 tie that b, nearer, wins
    assert two.predict(np.array([[4.4], [0.6]], np.float32)).tolist() == [2, 1]
    assert [t.label for t in two.classify(np.array([[0.6]], np.float32), top_k=2)[0].top] == ["b", "a"]


def test_a_hinge_head_has_one_margin_and_two_scores():
    head = LinearHead(["no", "yes"], 4, loss="hinge")
    with torch.no_grad():
        head.net[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        head.net[0].bias.zero_()
    proba = head.predict_proba(np.array([[2.0, 0, 0, 0], [-1.0, 0, 0, 0]], np.float32))
    assert head.net[0].out_features == 1 and proba.shape == (2, 2)
    assert head.predict(np.array([[2.0, 0, 0, 0], [-1.0, 0, 0, 0]], np.float32)).tolist() == [1, 0]


def test_features_of_the_wrong_width_are_refused(digits):
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        LinearHead(DIGITS, 64).predict(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        LinearHead(DIGITS, 64).predict(np.full((1, 64), np.nan, np.float32))


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "head"
    save_head(MLPHead(DIGITS, 64, hidden=(16,)), folder, META)
    return folder


def _edit(folder, change):
    doc = json.loads((folder / "head.json").read_text())
    change(doc)
    (folder / "head.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("key,change", [
    ("labels", lambda d: d.update(labels=["a", "a"] + DIGITS[2:])),
    ("feature_dim", lambda d: d.update(feature_dim=-1)),
    ("head.type", lambda d: d["head"].update(type="svm")),
    ("head.hidden", lambda d: d["head"].update(hidden=[0])),
    ("head.dropout", lambda d: d["head"].update(dropout=1.5)),
    ("version", lambda d: d.update(version=99)),
    ("embed", lambda d: d.pop("embed")),
    ("backbone", lambda d: d.update(backbone="")),
    ("format", lambda d: d.update(format="onnx")),
])
def test_a_bad_head_json_is_refused_naming_the_key(saved, key, change):
    _edit(saved, change)
    with pytest.raises(InvalidHead, match=f"key '{key}'"):
        load_head(saved)


def test_tensors_that_disagree_with_head_json_are_refused(saved):
    _edit(saved, lambda d: d.update(feature_dim=32))
    with pytest.raises(InvalidHead, match="does not match head.json"):
        load_head(saved)


def test_a_pickle_in_place_of_safetensors_is_refused_without_running_it(saved, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, saved / "head.safetensors")
    with pytest.raises(InvalidHead, match="not a readable safetensors"):
        load_head(saved)
    assert not marker.exists()


def test_a_symlink_leading_out_of_the_folder_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.json"
    os.replace(saved / "head.json", outside)
    os.symlink(outside, saved / "head.json")
    with pytest.raises(InvalidHead, match="symlink leading out"):
        load_head(saved)


def test_a_folder_without_head_files_is_refused(tmp_path):
    with pytest.raises(InvalidHead, match="head.json is missing"):
        load_head(tmp_path)
    (tmp_path / "head.json").write_text("{not json")
    (tmp_path / "head.safetensors").write_bytes(b"")
    with pytest.raises(InvalidHead, match="not valid JSON"):
        load_head(tmp_path)

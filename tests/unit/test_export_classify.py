"""ONNX export of classifiers and ViTs: the repository it writes, and ONNX Runtime answering as PyTorch does.

tiny_cnn and tiny_vit are seeded random; efficientnet_lite0 has its real ImageNet weights,
so its labels on real photos (skimage's coffee and cat) must come out the same on both backends.
"""
import dataclasses
import json

import numpy as np
import pytest
from skimage import data

from vfm.models import load_model
from vfm.models.export import export_model, folder_name
from vfm.models.export.common import parity_images
from vfm.models.registry import get_spec, register, unregister

# (height, width): landscape, portrait, square, a thin strip
SIZES = [(96, 160), (200, 90), (64, 64), (31, 300)]
MODELS = ["tiny_cnn", "tiny_vit", "efficientnet_lite0"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_repository")
    for name in MODELS:
        export_model(name, root)
    return root


@pytest.fixture(scope="module")
def images():
    return parity_images(seed=123, sizes=SIZES) + [data.coffee(), data.chelsea()]


def _runners(name, repo, **options):
    return (load_model(name, backend="torch", device="cpu", **options),
            load_model(name, backend="onnx", device="cpu", repository=repo, **options))


def test_export_writes_graph_and_config(repo):
    folder = repo / "tiny_cnn"
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "1" / "model.onnx").is_file()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "temporary folders were left behind"
    graph = config["graphs"]["model"]
    assert [i["name"] for i in graph["inputs"]] == ["input"]
    assert graph["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert [o["name"] for o in graph["outputs"]] == ["features", "logits"]
    assert graph["outputs"][1]["shape"] == ["batch", 10]
    assert config["preprocess"] == get_spec("tiny_cnn").preprocess.to_json()
    assert config["labels"] == list(get_spec("tiny_cnn").labels)
    assert config["opset"] == 17 and "dynamo=False" in config["exporter"]
    parity = config["parity"]
    tol = parity["tolerance"]
    assert 0 <= parity["logits_max_abs_diff"] <= tol["atol"] + tol["rtol"] * parity["logits_scale"]
    assert parity["top1_compared"] > 0 and len(parity["sizes"]) >= 3


@pytest.mark.parametrize("name", MODELS)
def test_onnx_classify_and_embed_match_torch(name, repo, images):
    torch_runner, onnx_runner = _runners(name, repo)
    assert onnx_runner.backend == "onnx"
    assert onnx_runner.info()["onnx"]["providers"]["model"] == ["CPUExecutionProvider"]
    expected = torch_runner.classify(images, top_k=5)
    got = onnx_runner.classify(images, top_k=5)
    for e, g in zip(expected, got):
        assert g.top[0].label == e.top[0].label
        # lower ranks may swap only where two scores are within float error of each other
        np.testing.assert_allclose([t.score for t in g.top], [t.score for t in e.top], atol=1e-5)
    for normalize in (False, True):
        np.testing.assert_allclose(onnx_runner.embed(images, normalize=normalize),
                                   torch_runner.embed(images, normalize=normalize), atol=2e-4, rtol=1e-4)
    # the batch axis is dynamic: one image at a time answers as the whole batch does
    alone = [onnx_runner.classify([im], top_k=3)[0] for im in images[:3]]
    assert [a.to_json() for a in alone] == [g.to_json() for g in onnx_runner.classify(images[:3], top_k=3)]


def test_efficientnet_lite0_real_weights_same_labels_on_photos(repo):
    torch_runner, onnx_runner = _runners("efficientnet_lite0", repo)
    photos = [data.coffee(), data.chelsea(), data.astronaut()]
    got, expected = onnx_runner.classify(photos, top_k=5), torch_runner.classify(photos, top_k=5)
    assert got[0].top[0].label == "espresso"
    assert [[t.label for t in c.top] for c in got] == [[t.label for t in c.top] for c in expected]
    np.testing.assert_allclose([[t.score for t in c.top] for c in got],
                               [[t.score for t in c.top] for c in expected], atol=1e-5)


def test_vit_pooling_is_a_load_option_of_the_onnx_runner(repo, images):
    for pooling in ("mean", "cls+mean"):
        torch_runner, onnx_runner = _runners("tiny_vit", repo, pooling=pooling)
        got, expected = onnx_runner.embed(images), torch_runner.embed(images)
        assert got.shape == expected.shape == (len(images), onnx_runner.feature_dim)
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pooling"):
        load_model("tiny_vit", backend="onnx", device="cpu", repository=repo, pooling="max")


def test_empty_and_bad_input_like_torch(repo):
    _, onnx_runner = _runners("tiny_cnn", repo)
    assert onnx_runner.classify([], top_k=3) == []
    assert onnx_runner.embed([]).shape == (0, get_spec("tiny_cnn").feature_dim)
    with pytest.raises(TypeError, match="list of images"):
        onnx_runner.classify(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="top_k"):
        onnx_runner.classify([np.zeros((8, 8, 3), np.uint8)], top_k=0)


def test_a_name_with_a_slash_gets_a_safe_folder(tmp_path, images):
    assert folder_name("google/vit-base-patch16-224") == "google--vit-base-patch16-224"
    spec = get_spec("tiny_cnn")
    register(dataclasses.replace(spec, name="acme/tiny-cnn"))
    try:
        result = export_model("acme/tiny-cnn", tmp_path)
        assert result.folder == tmp_path / "acme--tiny-cnn"
        assert [p.name for p in tmp_path.iterdir()] == ["acme--tiny-cnn"]
        runner = load_model("acme/tiny-cnn", backend="onnx", device="cpu", repository=tmp_path)
        expected = load_model("tiny_cnn", device="cpu").classify(images[:2], top_k=1)
        assert [c.top[0].label for c in runner.classify(images[:2], top_k=1)] == [c.top[0].label for c in expected]
    finally:
        unregister("acme/tiny-cnn")

"""The classification family through tiny_cnn, plus the structure of every full-size classifier."""
import numpy as np
import pytest
import torch

from vfm.models import InvalidImage, WeightsUnavailable, get_spec, list_models, load_model
from vfm.models.backends.torch import DeviceUnavailable
from vfm.models.checkpoints import save_state_dict

TORCHVISION_CLASSIFIERS = ["resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_cnn", device="cpu")


@pytest.fixture(scope="module")
def images():
    # different sizes and aspect ratios (tall, wide, square, smaller than the 32 px input)
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(120, 45), (37, 200), (20, 20)]]


def test_tiny_cnn_is_a_registered_seeded_backbone():
    spec = get_spec("tiny_cnn")
    assert spec.random_weights and spec.weights is None
    assert set(spec.tasks) == {"classify", "embed"}
    assert spec.labels == tuple(f"class_{i}" for i in range(10))
    assert set(TORCHVISION_CLASSIFIERS + ["tiny_cnn", "efficientnet_lite0"]) <= set(list_models(task="classify"))
    assert set(TORCHVISION_CLASSIFIERS + ["tiny_cnn", "efficientnet_lite0"]) <= set(list_models(task="embed"))


def test_classify_returns_sorted_top_k_softmax_scores(tiny, images):
    results = tiny.classify(images, top_k=4)
    assert len(results) == len(images)
    for result in results:
        scores = [label.score for label in result.top]
        assert len(scores) == 4
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 < s <= 1.0 for s in scores) and sum(scores) <= 1.0 + 1e-6
        assert len({label.index for label in result.top}) == 4
        assert all(label.label == f"class_{label.index}" for label in result.top)
    # all ten classes: a full softmax sums to one
    full = tiny.classify(images[:1], top_k=10)[0]
    assert sum(label.score for label in full.top) == pytest.approx(1.0, abs=1e-5)
    assert full.top[:4] == results[0].top


def test_top_k_is_validated_and_clamped(tiny, images):
    assert len(tiny.classify(images[:1], top_k=500)[0].top) == 10
    for bad in (0, -3, 2.5, "5", True):
        with pytest.raises(ValueError, match="top_k"):
            tiny.classify(images[:1], top_k=bad)


def test_embed_shape_and_normalisation(tiny, images):
    raw = tiny.embed(images)
    assert raw.shape == (3, get_spec("tiny_cnn").feature_dim) and raw.dtype == np.float32
    unit = tiny.embed(images, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    assert not np.allclose(raw[0], raw[1])  # different images, different features


def test_batch_of_mixed_sizes_equals_one_by_one(tiny, images):
    batch_emb = tiny.embed(images)
    batch_cls = tiny.classify(images, top_k=10)
    for i, image in enumerate(images):
        np.testing.assert_allclose(batch_emb[i], tiny.embed([image])[0], rtol=1e-5, atol=1e-6)
        single = tiny.classify([image], top_k=10)[0]
        assert [label.index for label in single.top] == [label.index for label in batch_cls[i].top]
        np.testing.assert_allclose([label.score for label in single.top],
                                   [label.score for label in batch_cls[i].top], rtol=1e-5, atol=1e-7)


def test_empty_list_and_bad_images(tiny, images):
    assert tiny.classify([], top_k=3) == []
    assert tiny.embed([]).shape == (0, get_spec("tiny_cnn").feature_dim)
    with pytest.raises(TypeError, match="list of images"):
        tiny.embed(images[0])
    with pytest.raises(InvalidImage):
        tiny.embed([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(TypeError, match="uint8"):
        tiny.embed([images[0].astype(np.float32)])
    grey = images[0][:, :, 0]  # HxW works as a grey image, like any decoded one
    assert tiny.embed([grey]).shape == (1, get_spec("tiny_cnn").feature_dim)


def test_random_init_is_seeded_and_leaves_the_callers_rng_alone(tiny, images):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("tiny_cnn", device="cpu", weights="random")
    assert torch.equal(torch.rand(3), expected)
    np.testing.assert_array_equal(again.embed(images), tiny.embed(images))


def test_options_are_checked(images):
    with pytest.raises(DeviceUnavailable, match="float16"):
        load_model("tiny_cnn", device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="float64"):
        load_model("tiny_cnn", device="cpu", dtype="float64")
    with pytest.raises(ValueError, match="colour"):
        load_model("tiny_cnn", device="cpu", colour="blue")
    fp32 = load_model("tiny_cnn", device="cpu", dtype="float32")
    assert fp32.embed(images[:1]).dtype == np.float32


def test_weights_file_round_trip_and_a_changed_file_changes_the_model(tiny, images, tmp_path):
    same = tmp_path / "same.safetensors"
    save_state_dict(tiny.state_dict(), same)
    reloaded = load_model("tiny_cnn", device="cpu", weights=str(same))
    np.testing.assert_array_equal(reloaded.embed(images), tiny.embed(images))
    assert reloaded.weights_path == same

    state = tiny.state_dict()
    state["fc.weight"] = state["fc.weight"] * -1.0  # reverses the class order, keeps the features
    flipped = tmp_path / "flipped.safetensors"
    save_state_dict(state, flipped)
    other = load_model("tiny_cnn", device="cpu", weights=str(flipped))
    np.testing.assert_array_equal(other.embed(images), tiny.embed(images))
    before, after = tiny.classify(images[:1], top_k=1)[0].top[0], other.classify(images[:1], top_k=1)[0].top[0]
    assert after.index != before.index


def test_a_checkpoint_of_another_network_is_refused_clearly(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_state_dict({"layer.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsUnavailable, match="does not fit model 'tiny_cnn'"):
        load_model("tiny_cnn", device="cpu", weights=str(wrong))
    state = load_model("tiny_cnn", device="cpu").state_dict()
    state["fc.weight"] = torch.zeros(3, state["fc.weight"].shape[1])  # right names, wrong shape
    reshaped = tmp_path / "reshaped.safetensors"
    save_state_dict(state, reshaped)
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        load_model("tiny_cnn", device="cpu", weights=str(reshaped))


@pytest.mark.parametrize("name", TORCHVISION_CLASSIFIERS)
def test_full_size_classifier_builds_with_random_weights(name):
    spec = get_spec(name)
    runner = load_model(name, device="cpu", weights="random")
    assert runner.weights_path is None
    assert spec.preprocess.size == 224 and spec.weights.sha256 and spec.weights.sha256 in spec.weights.url
    features, logits = runner.features_and_logits([np.full((30, 50, 3), 90, np.uint8)])
    assert features.shape == (1, spec.feature_dim) and logits.shape == (1, 1000)
    assert len(spec.labels) == 1000 and "tabby" in spec.labels


def test_offline_without_the_file_names_the_model_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VFM_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a developer's torch hub cache must not count
    with pytest.raises(WeightsUnavailable) as info:
        load_model("resnet50", device="cpu")
    message = str(info.value)
    assert "'resnet50'" in message
    assert str(tmp_path / "cache" / "resnet50" / "resnet50-11ad3fa6.pth") in message


@pytest.mark.parametrize("name,enum", [
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V2"), ("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    ("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"), ("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1"),
    ("swin_t", "Swin_T_Weights.IMAGENET1K_V1")])
def test_registered_metadata_matches_torchvisions_weights_enum(name, enum):
    # The specs are written out so that listing models needs no torchvision; they must not drift from it.
    import torchvision.models as tvm

    group, member = enum.split(".")
    weights = getattr(getattr(tvm, group), member)
    transform = weights.transforms()
    spec = get_spec(name)
    assert spec.weights.url == weights.url
    assert spec.preprocess.size == transform.crop_size[0]
    assert spec.preprocess.crop_pct == transform.crop_size[0] / transform.resize_size[0]
    assert spec.preprocess.interpolation == transform.interpolation.value
    assert list(spec.preprocess.mean) == list(transform.mean) and list(spec.preprocess.std) == list(transform.std)
    assert spec.labels == tuple(weights.meta["categories"])

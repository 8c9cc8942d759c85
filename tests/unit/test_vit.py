"""The ViT family (transformers): tiny_vit end to end, DINOv2 pooling at full size, weights folders, offline errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfm.models.backends.torch import DeviceUnavailable
from vfm.models.registry import get_spec
from vfm.models import UnsupportedTask, load_model
from vfm.models.weights import WeightsUnavailable

# Different sizes and aspect ratios (wide, tall, smaller than the 32x32 input).
SHAPES = [(48, 80), (120, 36), (20, 24)]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_vit", device="cpu")


def test_tiny_vit_classify_returns_sorted_softmax_top_k(tiny, images):
    results = tiny.classify(images, top_k=3)
    assert len(results) == len(images)
    for result in results:
        scores = [p.score for p in result.top]
        assert len(scores) == 3
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 < s <= 1.0 for s in scores)
        assert [p.label for p in result.top] == [f"class_{p.index}" for p in result.top]
    everything = tiny.classify(images[:1], top_k=10)[0].top
    assert sorted(p.index for p in everything) == list(range(10))
    assert sum(p.score for p in everything) == pytest.approx(1.0, abs=1e-5)


def test_tiny_vit_top_k_is_validated_and_capped(tiny, images):
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="top_k"):
            tiny.classify(images[:1], top_k=bad)
    assert len(tiny.classify(images[:1], top_k=50)[0].top) == 10


def test_tiny_vit_embed_shapes_and_normalize(tiny, images):
    raw = tiny.embed(images)
    unit = tiny.embed(images, normalize=True)
    assert raw.shape == unit.shape == (3, get_spec("tiny_vit").feature_dim) == (3, 32)
    assert raw.dtype == unit.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert not np.allclose(raw[0], raw[1])  # different images, different features
    assert tiny.embed([]).shape == (0, 32) and tiny.classify([]) == []


def test_batch_of_mixed_sizes_equals_one_by_one(tiny, images):
    batched = tiny.embed(images)
    single = np.concatenate([tiny.embed([im]) for im in images])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    for together, im in zip(tiny.classify(images, top_k=10), images):
        alone = tiny.classify([im], top_k=10)[0]
        assert {p.index: p.score for p in together.top} == pytest.approx({p.index: p.score for p in alone.top},
                                                                          abs=1e-6)
    # micro-batching inside the runner must not change anything either
    chunked = load_model("tiny_vit", device="cpu", batch_size=2)
    np.testing.assert_allclose(chunked.embed(images), batched, rtol=1e-5, atol=1e-6)


def test_random_init_is_seeded(tiny, images):
    again = load_model("tiny_vit", device="cpu")
    np.testing.assert_array_equal(again.embed(images), tiny.embed(images))
    other_seed = load_model("tiny_vit", device="cpu", seed=1)
    assert not np.allclose(other_seed.embed(images), tiny.embed(images))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="pooling must be one of cls, mean, cls\\+mean"):
        load_model("tiny_vit", device="cpu", pooling="max")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model("tiny_vit", device="cpu", attn_implementation="flash")
    with pytest.raises(DeviceUnavailable, match="float16 needs a CUDA device"):
        load_model("tiny_vit", device="cpu", dtype="float16")


def test_dinov2_small_random_pooling_dims(images):
    spec = get_spec("dinov2_small")
    assert spec.feature_dim == 384 and spec.tasks == ("embed",)
    feats = {}
    for pooling in ("cls", "mean", "cls+mean"):
        runner = load_model("dinov2_small", weights="random", device="cpu", pooling=pooling)
        feats[pooling] = runner.embed(images[:1])
        assert runner.feature_dim == feats[pooling].shape[1]
    assert feats["cls"].shape == feats["mean"].shape == (1, 384)
    assert feats["cls+mean"].shape == (1, 768)
    # cls+mean is the concatenation of the two poolings (DINOv2's linear-eval feature)
    np.testing.assert_allclose(feats["cls+mean"], np.concatenate([feats["cls"], feats["mean"]], axis=1),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats["cls"], feats["mean"])
    with pytest.raises(UnsupportedTask):
        runner.classify(images[:1])


def test_vit_base_random_has_the_imagenet_head(images):
    spec = get_spec("google/vit-base-patch16-224")
    assert len(spec.labels) == 1000 and spec.labels[0] == "tench"
    runner = load_model("google/vit-base-patch16-224", weights="random", device="cpu")
    top = runner.classify(images[:1], top_k=5)[0].top
    assert [p.label for p in top] == [spec.labels[p.index] for p in top]
    assert runner.embed(images[:1]).shape == (1, 768)
    assert runner.info()["labels"][281] == "tabby"


def test_weights_folder_round_trip(tmp_path, images):
    # A seed the default does not use, so a load that silently fell back to the random init would differ.
    trained = load_model("tiny_vit", device="cpu", seed=123)
    trained.model.save_pretrained(tmp_path)
    loaded = load_model("tiny_vit", device="cpu", weights=str(tmp_path))
    assert loaded.weights_path == tmp_path
    np.testing.assert_array_equal(loaded.embed(images), trained.embed(images))
    assert [c.to_json() for c in loaded.classify(images)] == [c.to_json() for c in trained.classify(images)]
    assert not np.allclose(loaded.embed(images), load_model("tiny_vit", device="cpu").embed(images))


def test_fine_tuned_folder_brings_its_own_labels(tmp_path, images):
    from transformers import ViTConfig, ViTForImageClassification

    from vfm.models.families.vit import TINY_VIT

    names = ["cat", "dog", "bird"]
    config = ViTConfig(**TINY_VIT, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    runner = load_model("tiny_vit", device="cpu", weights=str(tmp_path))
    assert runner.labels == tuple(names)
    assert {p.label for p in runner.classify(images[:1], top_k=5)[0].top} == set(names)


def test_wrong_folders_are_refused_with_a_reason(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailable, match="no config.json"):
        load_model("tiny_vit", device="cpu", weights=str(empty))
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                             patch_size=14)).save_pretrained(dino)
    with pytest.raises(WeightsUnavailable, match="holds a 'dinov2' model; 'tiny_vit' needs a 'vit' one"):
        load_model("tiny_vit", device="cpu", weights=str(dino))
    with pytest.raises(WeightsUnavailable, match="hidden size 32; 'dinov2_small' has 384"):
        load_model("dinov2_small", device="cpu", weights=str(dino))


def test_offline_with_an_empty_hf_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("VFM_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads its environment once, at import; snapshot_download reads this constant per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable) as err:
        load_model("dinov2_small", device="cpu")
    message = str(err.value)
    for needed in ("'dinov2_small'", "hf:facebook/dinov2-small", str(tmp_path / "hub"), "VFM_OFFLINE=1",
                   "huggingface-cli download facebook/dinov2-small", "weights: /path/to/folder"):
        assert needed in message

"""finetune/features.py: frozen tiny_cnn features, the on-disk cache, unreadable images, Ray Data."""
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vfm.finetune.data import open_dataset
from vfm.finetune.extractors import BackboneError, make_extractor
from vfm.finetune.features import extract_features
from vfm.finetune.features_ray import RayOptions


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """150 digits as PNG files (8x8 grey, upscaled by the backbone's preprocessing)."""
    x, y = load_digits(return_X_y=True)
    root = tmp_path_factory.mktemp("digits")
    for i in range(150):
        (root / str(y[i])).mkdir(exist_ok=True)
        Image.fromarray((x[i] * 255 / 16).astype(np.uint8).reshape(8, 8)).save(root / str(y[i]) / f"{i:03d}.png")
    return root


def test_a_second_run_runs_no_backbone_forward(folder, tmp_path):
    # (tiny_cnn has no weights file, so its key digests a probe forward of two fixed images; a
    # backbone with a weights file is not even loaded on a cached run: see the e2e test.)
    source = open_dataset(str(folder)).source
    first = make_extractor("tiny_cnn", device="cpu")
    cold = extract_features(source, first, tmp_path, batch_size=32, progress=False)
    assert cold.stats.computed == 150 and first.images_embedded == 150 and cold.valid.all()
    again = make_extractor("tiny_cnn", device="cpu")
    warm = extract_features(source, again, tmp_path, batch_size=32, progress=False)
    assert warm.stats.cached == 150 and warm.stats.computed == 0 and again.images_embedded == 0
    np.testing.assert_array_equal(warm.features, cold.features)
    # the cache holds what embed() gives at serve time
    images = [source.load(i) for i in (0, 77)]
    np.testing.assert_allclose(warm.features[[0, 77]], again.runner.embed(images), rtol=1e-5, atol=1e-6)


def test_a_corrupt_cache_entry_is_detected_and_recomputed_alone(folder, tmp_path):
    source = open_dataset(str(folder)).source
    cold = extract_features(source, make_extractor("tiny_cnn", device="cpu"), tmp_path, progress=False,
                            chunk_size=50)
    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 3
    data = bytearray(entries[1].read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the stored features
    entries[1].write_bytes(bytes(data))
    entries[2].write_bytes(entries[2].read_bytes()[:100])  # truncated
    ext = make_extractor("tiny_cnn", device="cpu")
    warm = extract_features(source, ext, tmp_path, progress=False, chunk_size=50)
    assert warm.stats.corrupt_chunks == 2 and ext.images_embedded == 100 and warm.stats.cached == 50
    np.testing.assert_array_equal(warm.features, cold.features)
    third = make_extractor("tiny_cnn", device="cpu")
    extract_features(source, third, tmp_path, progress=False, chunk_size=50)
    assert third.images_embedded == 0  # repaired


def test_the_key_covers_pixels_normalize_and_backbone(folder, tmp_path):
    data = open_dataset(str(folder))
    plain = extract_features(data.source, make_extractor("tiny_cnn", device="cpu"), tmp_path, progress=False)
    unit = make_extractor("tiny_cnn", device="cpu", normalize=True)
    normed = extract_features(data.source, unit, tmp_path, progress=False)
    assert unit.images_embedded == 150
    np.testing.assert_allclose(np.linalg.norm(normed.features, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normed.features, plain.features / np.linalg.norm(plain.features, axis=1,
                                                                                 keepdims=True), rtol=1e-4, atol=1e-6)
    # an image that changes on disk is recomputed
    changed = data.source.paths[5]
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    ext = make_extractor("tiny_cnn", device="cpu")
    after = extract_features(data.source, ext, tmp_path, progress=False)
    assert ext.images_embedded == 150 and not np.allclose(after.features[5], plain.features[5])
    np.testing.assert_allclose(after.features[6:], plain.features[6:], rtol=1e-5, atol=1e-6)


def test_unreadable_images_are_counted_and_skipped(folder, tmp_path):
    root = tmp_path / "mixed"
    for cls in ("0", "1"):
        (root / cls).mkdir(parents=True)
        for f in sorted((folder / cls).iterdir()):
            (root / cls / f.name).write_bytes(f.read_bytes())
    (root / "0" / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "1" / sorted(os.listdir(root / "1"))[0]).read_bytes()
    (root / "1" / "truncated.png").write_bytes(good[: len(good) // 2])
    data = open_dataset(str(root))
    ext = make_extractor("pixels:8", device="cpu")
    first = extract_features(data.source, ext, tmp_path / "cache", progress=False)
    bad = {os.path.basename(data.source.describe(i)) for i in np.flatnonzero(~first.valid)}
    assert first.stats.skipped == 2 and bad == {"garbage.png", "truncated.png"}
    assert any("garbage.png" in r for r in first.stats.skipped_examples)
    again = extract_features(data.source, make_extractor("pixels:8"), tmp_path / "cache", progress=False)
    assert again.stats.skipped == 2 and again.stats.cached == len(data)  # the cache remembers them
    np.testing.assert_array_equal(again.valid, first.valid)


def test_pixels_and_backbone_checks(folder):
    source = open_dataset(str(folder)).source
    feats = make_extractor("pixels:4").embed([source.load(0)])
    assert feats.shape == (1, 16) and 0 <= feats.min() and feats.max() <= 1
    assert make_extractor("pixels:6:rgb").feature_dim == 108
    with pytest.raises(BackboneError, match="cannot be a backbone"):
        make_extractor("mtcnn_faces")
    with pytest.raises(BackboneError, match="pixels:SIZE"):
        make_extractor("pixels:big")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    temp = tempfile.mkdtemp(prefix="ray-ft-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_data_extraction_matches_in_process_and_fills_the_cache(folder, tmp_path, local_ray):
    source = open_dataset(str(folder)).source
    ray_ext = make_extractor("tiny_cnn", device="cpu")
    remote = extract_features(source, ray_ext, tmp_path, batch_size=16, progress=False,
                              ray=RayOptions("local", actors=2), chunk_size=64)
    assert remote.stats.computed == 150 and ray_ext.images_embedded == 0  # the actors did the work
    local = extract_features(source, make_extractor("tiny_cnn", device="cpu"), None, progress=False)
    np.testing.assert_allclose(remote.features, local.features, rtol=1e-5, atol=1e-6)
    again = make_extractor("tiny_cnn", device="cpu")
    cached = extract_features(source, again, tmp_path, progress=False, chunk_size=64)
    assert again.images_embedded == 0 and cached.stats.cached == 150

"""finetune/loader.py + features.py: the streamed extraction (DataLoader workers, the backbone's
network on resized batches, chunks cached as they complete) gives the features `runner.embed` gives,
on PyTorch and on ONNX Runtime."""
import numpy as np
import pytest

from vfm.finetune.data import open_dataset
from vfm.finetune.extractors import BackboneError, BackboneExtractor, make_extractor
from vfm.finetune.features import extract_features
from vfm.models import load_model

FASHION = "idx:/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def source():
    """300 Fashion-MNIST test images (28x28 grey)."""
    data = open_dataset(FASHION)
    return data.source.subset(np.flatnonzero(data.given_split == 2)[:300])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_features_are_those_of_runner_embed(source, tmp_path, workers):
    feats = extract_features(source, make_extractor("tiny_cnn", device="cpu"), tmp_path, batch_size=64,
                             progress=False, workers=workers, chunk_size=128)
    runner = load_model("tiny_cnn", device="cpu")
    old = np.concatenate([runner.embed([source.load(i) for i in range(s, min(s + 50, len(source)))])
                          for s in range(0, len(source), 50)])
    assert feats.valid.all() and feats.stats.computed == 300
    np.testing.assert_allclose(feats.features, old, rtol=1e-5, atol=1e-6)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3  # 128 + 128 + 44


class _KilledAfter(BackboneExtractor):
    """tiny_cnn, interrupted (as by Ctrl-C) when asked for its fourth batch."""

    def __init__(self):
        super().__init__("tiny_cnn", device="cpu")
        self.batches = 0

    def embed_prepared(self, prepared):
        self.batches += 1
        if self.batches == 4:
            raise KeyboardInterrupt
        return super().embed_prepared(prepared)


def test_each_chunk_is_cached_as_soon_as_it_is_complete(source, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract_features(source, _KilledAfter(), tmp_path, batch_size=32, progress=False, workers=0, chunk_size=64)
    again = extract_features(source, make_extractor("tiny_cnn", device="cpu"), tmp_path, batch_size=32,
                             progress=False, workers=0, chunk_size=64)
    assert again.stats.cached == 64 and again.stats.computed == 236  # batches 1-2 made chunk 1; 3 was lost


def test_onnx_extraction_matches_torch_and_is_cached_apart(source, tmp_path):
    from vfm.models.export import export_model

    export_model("tiny_cnn", tmp_path / "repo")
    torch_feats = extract_features(source, make_extractor("tiny_cnn", device="cpu"), tmp_path / "cache",
                                   progress=False, workers=0)
    onnx = make_extractor("tiny_cnn", device="cpu", backend="onnx", repository=tmp_path / "repo")
    onnx_feats = extract_features(source, onnx, tmp_path / "cache", progress=False, workers=0)
    assert onnx_feats.stats.computed == 300 and onnx.runner.backend == "onnx"
    assert onnx.key()["backend"] == "onnx" and "backend" not in make_extractor("tiny_cnn").key()
    np.testing.assert_allclose(onnx_feats.features, torch_feats.features, rtol=1e-4, atol=1e-5)


def test_a_missing_onnx_export_is_a_one_line_error_that_says_what_to_run(source, tmp_path):
    extractor = make_extractor("tiny_cnn", device="cpu", backend="onnx", repository=tmp_path / "empty")
    with pytest.raises(BackboneError) as info:
        extract_features(source, extractor, tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "\n" not in message and "vfm export tiny_cnn --out DIR" in message and "--repository" in message
    with pytest.raises(BackboneError, match="applies to a zoo backbone"):
        make_extractor("pixels", backend="onnx")

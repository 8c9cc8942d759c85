"""Transformer exports: torchvision's ViT-B/16 exports at all, and fused graphs (attention, LayerNorm,
GELU) answer as PyTorch does; the session options an export records are the ones its sessions open with.

vit_b_16 is full size with seeded random weights (no download); the fused structures are tiny_vit
(transformers ViT), a DINOv2-structured tiny backbone (LayerScale, SDPA attention) and a Swin-structured
tiny torchvision classifier (shifted windows, relative-position bias, patch merging).
"""
import dataclasses
import json

import numpy as np
import onnx
import pytest
from skimage import data

from vfm.models import load_model
from vfm.models.backends.onnx import OnnxSession, SessionSettings, session_options
from vfm.models.export import export_model
from vfm.models.export.common import parity_images
from vfm.models.families import classification, vit
from vfm.models.registry import get_spec, register, unregister

TINY_DINOV2 = dict(vit.DINOV2_SMALL, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56)


def _ops(path):
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def tiny_dinov2():
    """A DINOv2 backbone of dinov2_small's structure (LayerScale, 14-pixel patches), 2 layers of 48 wide."""
    name = "test/tiny-dinov2"

    def build(spec, weights_path, device, **options):
        return vit._build(spec, weights_path, device, model_type="dinov2", arch=TINY_DINOV2, **options)

    spec = dataclasses.replace(get_spec("dinov2_small"), name=name, builder=build, weights=None,
                               random_weights=True, feature_dim=48,
                               preprocess=dataclasses.replace(vit.DINOV2_PREPROCESS, size=56, crop_pct=56 / 64))
    register(spec)
    yield name
    unregister(name)


@pytest.fixture(scope="module")
def tiny_swin():
    """swin_t's structure (torchvision SwinTransformer v1: 7x7 windows, shifted every other block, patch
    merging), 24 wide, three stages of two blocks, 10 classes; registered once per crop size used below."""
    names = []

    def make_spec(crop):
        name = f"test/tiny-swin-{crop}"

        def build(spec, weights_path, device, **options):
            def make():
                from torchvision.models.swin_transformer import SwinTransformer

                return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                       window_size=[7, 7], num_classes=10)

            return classification.build_classifier(spec, make, "head", weights_path, device, **options)

        base = get_spec("swin_t")
        spec = dataclasses.replace(base, name=name, builder=build, weights=None, random_weights=True,
                                   feature_dim=96, labels=[f"class {i}" for i in range(10)],
                                   preprocess=dataclasses.replace(base.preprocess, size=crop))
        register(spec)
        names.append(name)
        return name

    yield make_spec
    for name in names:
        unregister(name)


def test_vit_b_16_random_weights_exports_and_matches_pytorch(tmp_path):
    result = export_model("vit_b_16", tmp_path, weights="random")
    config = result.config
    parity, tol = config["parity"], config["parity"]["tolerance"]
    assert 0 <= parity["features_max_abs_diff"] <= tol["atol"] + tol["rtol"] * parity["features_scale"]
    # torchvision's nn.MultiheadAttention is traced per head and fused into ONNX Runtime's kernel;
    # the default level fuses attention only
    assert config["graphs"]["model"]["optimization"] == {"level": "attention", "fusions": {"MultiHeadAttention": 12}}
    photo = [data.astronaut()]
    onnx_runner = load_model("vit_b_16", backend="onnx", device="cpu", weights="random", repository=tmp_path)
    torch_runner = load_model("vit_b_16", device="cpu", weights="random")
    np.testing.assert_allclose(onnx_runner.embed(photo), torch_runner.embed(photo), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("model", ["tiny_vit", "tiny_dinov2"])
def test_fused_transformer_export_matches_pytorch(model, tiny_dinov2, tmp_path):
    name = tiny_dinov2 if model == "tiny_dinov2" else model
    fused = export_model(name, tmp_path / "fused", fuse="all")   # every pass: attention, LayerNorm, GELU
    plain = export_model(name, tmp_path / "plain", fuse=False)
    assert fused.config["graphs"]["model"]["optimization"]["level"] == "all"
    fusions = fused.config["graphs"]["model"]["optimization"]["fusions"]
    assert fusions["MultiHeadAttention"] == 2 and fusions["SkipLayerNormalization"] >= 2
    assert fusions.get("BiasGelu", 0) + fusions.get("Gelu", 0) == 2
    ops = _ops(fused.files[0])
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 2 and ("", "Softmax") not in ops
    assert ("", "Softmax") in _ops(plain.files[0]) and plain.config["graphs"]["model"]["optimization"] is None

    torch_runner = load_model(name, device="cpu")
    onnx_runner = load_model(name, backend="onnx", device="cpu", repository=tmp_path / "fused")
    images = parity_images(seed=7, sizes=[(96, 160), (200, 90), (64, 64), (31, 300)]) + [data.chelsea()]
    tol = fused.config["parity"]["tolerance"]
    for pooling in ("cls", "cls+mean"):
        onnx_runner.pooling = torch_runner.pooling = pooling
        got, expected = onnx_runner.embed(images), torch_runner.embed(images)
        assert np.max(np.abs(got - expected)) <= tol["atol"] + tol["rtol"] * np.max(np.abs(expected))
    # one image at a time answers as the batch does (the fused attention keeps the batch axis dynamic)
    np.testing.assert_allclose(onnx_runner.embed(images[:1]), onnx_runner.embed(images)[:1], atol=1e-5)


# 112: 28x28 tokens, shifted windows in stages 1 and 2, none in stage 3 (7x7 is one window); 100: 25x25
# tokens, padded to whole windows, an odd 13x13 stage padded for patch merging, shifts on padded maps
@pytest.mark.parametrize("crop", [112, 100])
def test_fused_swin_export_matches_pytorch(crop, tiny_swin, tmp_path):
    name = tiny_swin(crop)
    result = export_model(name, tmp_path)
    # every window attention, shifted or not, is one MultiHeadAttention with the bias (and mask) as attention_bias
    assert result.config["graphs"]["model"]["optimization"] == {"level": "attention",
                                                                 "fusions": {"MultiHeadAttention": 6}}
    graph = onnx.load(str(result.files[0])).graph
    ops = [(n.domain, n.op_type) for n in graph.node]
    assert ("", "Softmax") not in ops and ("", "ScatterND") not in ops
    assert all(len(n.input) == 6 and n.input[5] for n in graph.node if n.op_type == "MultiHeadAttention")

    torch_runner = load_model(name, device="cpu")
    onnx_runner = load_model(name, backend="onnx", device="cpu", repository=tmp_path)
    images = parity_images(seed=11, sizes=[(96, 160), (200, 90), (64, 64), (31, 300)]) + [data.chelsea()]
    tol = result.config["parity"]["tolerance"]
    got, expected = onnx_runner.embed(images), torch_runner.embed(images)
    assert np.max(np.abs(got - expected)) <= tol["atol"] + tol["rtol"] * np.max(np.abs(expected))
    top_onnx = [r.top[0].label for r in onnx_runner.classify(images, top_k=1)]
    assert top_onnx == [r.top[0].label for r in torch_runner.classify(images, top_k=1)]
    # the shift mask is repeated over the batch inside the graph: one image answers as in a batch
    np.testing.assert_allclose(onnx_runner.embed(images[:1]), got[:1], atol=1e-5)
    # and the unfused graph (the module as torchvision traces it) still exports and agrees
    plain = export_model(name, tmp_path / "plain", fuse=False)
    assert ("", "Softmax") in _ops(plain.files[0])


def test_cnn_graphs_are_left_as_traced(tmp_path):
    assert export_model("tiny_cnn", tmp_path).config["graphs"]["model"]["optimization"] is None


def test_a_bad_fusion_level_is_refused_before_anything_is_written(tmp_path):
    from vfm.models.export.common import ExportError

    with pytest.raises(ExportError, match="fuse must be one of"):
        export_model("tiny_vit", tmp_path, fuse="everything")
    assert list(tmp_path.iterdir()) == []


def test_recorded_session_options_open_the_sessions(tmp_path):
    result = export_model("tiny_vit", tmp_path)
    config = json.loads((result.folder / "config.json").read_text())
    assert config["session"]["graph_optimization_level"] == "all"
    settings = SessionSettings(device="cpu")
    path = result.files[0]
    basic = OnnxSession(path, settings, {"graph_optimization_level": "basic", "enable_cpu_mem_arena": False,
                                         "intra_op_threads": 1})
    opened = basic.session.get_session_options()
    assert str(opened.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert opened.enable_cpu_mem_arena is False and opened.intra_op_num_threads == 1
    # the replica's own thread count wins over the recorded one
    assert session_options(SessionSettings(num_threads=2), {"intra_op_threads": 1}).intra_op_num_threads == 2
    # an export made by another vfm with values this one does not know still opens, on the defaults
    odd = session_options(settings, {"graph_optimization_level": "turbo", "enable_mem_pattern": "yes"})
    assert str(odd.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    runner = load_model("tiny_vit", backend="onnx", device="cpu", repository=tmp_path)
    assert runner.classify([data.coffee()], top_k=1)[0].top[0].label == \
        load_model("tiny_vit", device="cpu").classify([data.coffee()], top_k=1)[0].top[0].label

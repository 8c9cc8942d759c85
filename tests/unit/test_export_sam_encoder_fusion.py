"""SAM's image encoder exports fused: every attention (windowed and global) is one ONNX Runtime
MultiHeadAttention kernel with the decomposed relative-position bias, computed from the query in the
graph, as its attention_bias; and the fused encoder answers as PyTorch does within the parity tolerance.

tiny_sam's relative-position tables start at zero (segment-anything's init), which would make the bias
vanish; the SAM here is tiny_sam's structure with seeded random tables (as a trained checkpoint has) and
6-token windows, so the 16x16 token grid is padded to 18x18 (3x3 windows) in its windowed block.
"""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from skimage import data

from vfm.models import load_model
from vfm.models.export import export_model
from vfm.models.export.common import parity_images
from vfm.models.families import sam
from vfm.models.registry import get_spec, register, unregister

TINY_SAM_PADDED = dataclasses.replace(sam.TINY_SAM, window_size=6)


@pytest.fixture(scope="module")
def relpos_sam():
    name = "test/tiny-sam-relpos"

    def build(spec, weights_path, device, dtype=None):
        runner = sam.build_sam_runner(spec, TINY_SAM_PADDED, None, device, dtype)
        generator = torch.Generator().manual_seed(13)
        with torch.no_grad():
            for block in runner.model.image_encoder.blocks:
                for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
                    table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
        return runner

    register(dataclasses.replace(get_spec("tiny_sam"), name=name, builder=build,
                                 extra={"config": TINY_SAM_PADDED.to_json()}))
    yield name
    unregister(name)


def _encoder_ops(result):
    graph = onnx.load(str(result.folder / "1" / "encoder.onnx")).graph
    return graph, [(n.domain, n.op_type) for n in graph.node]


def test_fused_sam_encoder_matches_pytorch(relpos_sam, tmp_path):
    fused = export_model(relpos_sam, tmp_path / "fused")
    plain = export_model(relpos_sam, tmp_path / "plain", fuse=False)
    # both blocks (one windowed and padded, one global) run as one kernel each, bias and all
    assert fused.config["graphs"]["encoder"]["optimization"] == {"level": "attention",
                                                                  "fusions": {"MultiHeadAttention": 2}}
    graph, ops = _encoder_ops(fused)
    assert ("", "Softmax") not in ops and ("", "Einsum") not in ops
    kernels = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(kernels) == 2 and all(len(n.input) == 6 and n.input[5] for n in kernels)
    plain_graph, plain_ops = _encoder_ops(plain)
    assert ("", "Softmax") in plain_ops and len(graph.node) < len(plain_graph.node)

    # the export's own parity (square, portrait, landscape; embeddings, logits, masks) held; and again here
    tol = fused.config["parity"]["tolerance"]
    torch_runner = load_model(relpos_sam, device="cpu")
    onnx_runner = load_model(relpos_sam, backend="onnx", device="cpu", repository=tmp_path / "fused")
    images = parity_images(seed=21, sizes=[(256, 256), (300, 120), (90, 410)]) + [data.astronaut()]
    for image in images:
        got = np.asarray(onnx_runner.encode([image])[0].features)
        expected = np.asarray(torch_runner.encode([image])[0].features)
        assert np.max(np.abs(got - expected)) <= tol["atol"] + tol["rtol"] * np.max(np.abs(expected))
    # the relative-position bias is really in play: zeroing its tables changes the embedding
    image = images[0]
    with torch.no_grad():
        saved = [(b.attn.rel_pos_h.clone(), b.attn.rel_pos_w.clone()) for b in torch_runner.model.image_encoder.blocks]
        for block in torch_runner.model.image_encoder.blocks:
            block.attn.rel_pos_h.zero_()
            block.attn.rel_pos_w.zero_()
        zeroed = np.asarray(torch_runner.encode([image])[0].features)
        for block, (h, w) in zip(torch_runner.model.image_encoder.blocks, saved):
            block.attn.rel_pos_h.copy_(h)
            block.attn.rel_pos_w.copy_(w)
    got = np.asarray(onnx_runner.encode([image])[0].features)
    assert np.max(np.abs(got - zeroed)) > 100 * (tol["atol"] + tol["rtol"] * np.max(np.abs(zeroed)))
    # a batch answers image by image (the bias is per image: the batch axis stays dynamic)
    batch = onnx_runner.encode(images[:3])
    for image, embedding in zip(images[:3], batch):
        np.testing.assert_allclose(embedding.features, onnx_runner.encode([image])[0].features, atol=1e-5)


def test_sam_encoder_every_pass_matches_pytorch(relpos_sam, tmp_path):
    # fuse="all": + ONNX Runtime's LayerNorm / SkipLayerNorm / GELU fusions, under the same parity check
    result = export_model(relpos_sam, tmp_path, fuse="all")
    optimization = result.config["graphs"]["encoder"]["optimization"]
    assert optimization["level"] == "all" and optimization["fusions"]["MultiHeadAttention"] == 2
    assert optimization["fusions"].get("SkipLayerNormalization", 0) + \
        optimization["fusions"].get("LayerNormalization", 0) >= 2
    parity = result.config["parity"]
    tol = parity["tolerance"]
    assert parity["image_embeddings_max_abs_diff"] <= tol["atol"] + tol["rtol"] * parity["image_embeddings_scale"]
    assert parity["mask_iou_min"] >= tol["min_iou"]

"""What static int8 quantizes (vfm.models.export.quantize.quantize_graph): every op of a convolutional graph;
only the weight ops of a graph with float-only ops (LayerNorm, GELU), whose MatMuls write float so ONNX Runtime
runs them as MatMulIntegerToFloat; a layer scale after a Linear is folded into its weights; and a small constant
the exporter shared between nodes is unshared first."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from vfm.models import get_spec
from vfm.models.export.quantize import WEIGHT_OPS, VariantOptions, quantize_graph


class ConvNeXtish(torch.nn.Module):
    """A convnext block's shape: depthwise conv, channels-last LayerNorm, Linear-GELU-Linear, layer scale, residual;
    every bias zero (as a random init leaves them), so the exporter merges them into one initializer."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 4, stride=4)
        self.dw = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = torch.nn.LayerNorm(c)
        self.fc1, self.fc2 = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)
        self.scale = torch.nn.Parameter(torch.full((c,), 0.5))
        self.head = torch.nn.Linear(c, 5)
        for m in (self.stem, self.dw, self.fc1, self.fc2, self.head):
            torch.nn.init.zeros_(m.bias)
        torch.nn.init.zeros_(self.norm.bias)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(y)))) * self.scale
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


class ResNetish(torch.nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.a, self.b = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)
        self.head = torch.nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        return self.head(x.mean((2, 3)))


def _export(module: torch.nn.Module, path) -> None:
    torch.manual_seed(0)
    module.eval()
    torch.onnx.export(module, torch.randn(1, 3, 32, 32), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _quantize(module, tmp_path, calibration):
    torch.manual_seed(0)
    model = module()
    src, dst = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    _export(model, src)
    feeds = [{"input": np.random.default_rng(i).normal(size=(1, 3, 32, 32)).astype(np.float32)} for i in range(8)]
    made = quantize_graph(src, dst, get_spec("tiny_cnn"), VariantOptions(quantize="int8", calibration=calibration),
                          feeds=feeds)
    return src, dst, made


def _optimized_ops(path, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_a_graph_with_layernorm_and_gelu_quantizes_only_its_weight_ops_and_matmuls_write_float(tmp_path, calibration):
    src, dst, made = _quantize(ConvNeXtish, tmp_path, calibration)
    assert made["quantize"]["op_types"] == list(WEIGHT_OPS) and made["quantize"]["matmul_outputs"] == "float32"
    ops = _optimized_ops(dst, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 2 and ops["QLinearConv"] == 2, ops
    # GELU, the layer scale and the residual stay float ops, not int8 ones with a quantize pair around each
    assert not {"QLinearMul", "QLinearAdd"} & set(ops), ops
    quantized = onnx.load(str(dst))
    vectors = {t.name for t in quantized.graph.initializer if len(t.dims) == 1}
    assert not [n for n in quantized.graph.node if n.op_type == "Mul" and set(n.input) & vectors], \
        "the layer scale should be folded into fc2's weights and bias"
    x = np.random.default_rng(9).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ref, got = _run(src, x), _run(dst, x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_a_convolutional_graph_quantizes_every_op_with_an_int8_kernel(tmp_path, calibration):
    src, dst, made = _quantize(ResNetish, tmp_path, calibration)
    assert made["quantize"]["op_types"] == "all"
    ops = _optimized_ops(dst, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1, ops  # the residual add runs in int8 too


def test_the_exporters_shared_zero_bias_is_unshared_before_quantizing(tmp_path, calibration):
    src, dst, _ = _quantize(ConvNeXtish, tmp_path, calibration)
    exported = onnx.load(str(src))
    constants = {t.name for t in exported.graph.initializer}
    readers = Counter(i for n in exported.graph.node for i in n.input if i in constants)
    assert max(readers.values()) > 1  # the exporter merged the equal biases: the case this guards
    quantized = onnx.load(str(dst))
    made_by = {o: n for n in quantized.graph.node for o in n.output}
    constants = {t.name for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type == "LayerNormalization":  # its bias is its own float constant, not a dequantized int32 one
            assert all(i in constants or made_by[i].op_type != "DequantizeLinear" for i in node.input[1:]), node

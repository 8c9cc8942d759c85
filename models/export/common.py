"""What every family's ONNX export shares: the exporter call, graph files, IO description,
parity tolerances and the checks that fail an export loudly.

Every graph is written by the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``):
the dynamo exporter fails on torchvision's detectors and on SAM's decoder, and one exporter
for every family keeps the exports comparable.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
DEFAULT_OPSET = 17
MIN_OPSET = 11          # torchvision's detectors need 11 (dynamic Resize, NonMaxSuppression)
# protobuf cannot hold a model over 2 GiB; past this the weights go to one external .data file
EXTERNAL_DATA_BYTES = 1_800_000_000

# Sizes (height, width) of the random images parity runs on: landscape, portrait, square, and
# odd sizes whose aspect ratios differ from any the graph was traced with.
PARITY_SIZES: tuple[tuple[int, int], ...] = ((240, 320), (400, 300), (256, 256), (123, 457), (517, 190))


class ExportError(RuntimeError):
    """An export that could not be made (unsupported model, exporter failure, bad option)."""


class ParityError(ExportError):
    """ONNX Runtime does not match PyTorch within the stated tolerance: the graph is not published."""


@dataclass(frozen=True)
class Tolerance:
    """How close ONNX Runtime must be to PyTorch for an export to be published.

    Tensors (logits, features, embeddings, mask logits): ``max|ort - torch| <= atol + rtol * max|torch|``.
    Detections: each box corner within ``box_atol_px + box_rtol * max(height, width)`` pixels,
    each score within ``score_atol``. SAM masks (thresholded, at the original size): IoU >= ``min_iou``.
    """

    atol: float = 1e-4
    rtol: float = 1e-3
    box_atol_px: float = 0.05
    box_rtol: float = 1e-4
    score_atol: float = 1e-3
    min_iou: float = 0.99

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]     # a string is a dynamic axis


@dataclass
class GraphFile:
    """One ONNX graph of an export, as config.json describes it."""

    key: str                   # "model", or "encoder"/"decoder" (SAM), "pnet"/"rnet"/"onet" (MTCNN)
    file: str                  # relative to the version folder
    external_data: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_axes: dict[str, dict[int, str]]
    optimization: dict[str, Any] | None = None   # transformer fusion: fused-op counts (models/export/optimize.py)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["dynamic_axes"] = {k: {str(i): n for i, n in v.items()} for k, v in self.dynamic_axes.items()}
        return out


@dataclass
class FamilyExport:
    """What a family exporter hands back: its graphs, the parity figures and runner settings."""

    kind: str                              # which ONNX runner serves it (config.json "kind"; see families.ONNX_RUNNERS)
    graphs: list[GraphFile]
    parity: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)   # family settings the ONNX runner needs
    labels: list[str] | None = None
    session: dict[str, Any] = field(default_factory=dict)   # session options measured for the family (config.json)


@dataclass
class Parity:
    """Collects the worst differences seen across the parity inputs."""

    tolerance: Tolerance
    sizes: Sequence[Sequence[int]] = PARITY_SIZES     # what the inputs were, for config.json
    figures: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def tensor(self, what: str, ort_value: np.ndarray, torch_value: np.ndarray) -> float:
        """Record max |diff| of one tensor pair; raise ``ParityError`` past ``atol + rtol * scale``."""
        ort_value, torch_value = np.asarray(ort_value, np.float64), np.asarray(torch_value, np.float64)
        if ort_value.shape != torch_value.shape:
            raise ParityError(f"parity: {what} has shape {ort_value.shape} in ONNX Runtime but "
                              f"{torch_value.shape} in PyTorch.")
        diff = float(np.max(np.abs(ort_value - torch_value))) if ort_value.size else 0.0
        scale = float(np.max(np.abs(torch_value))) if torch_value.size else 0.0
        limit = self.tolerance.atol + self.tolerance.rtol * scale
        if not diff <= limit:  # also catches NaN
            raise ParityError(f"parity: {what} differs by {diff:.3g} between ONNX Runtime and PyTorch "
                              f"(limit {limit:.3g} = atol {self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} "
                              f"x {scale:.3g}); the export is not published.")
        self.worst(f"{what}_max_abs_diff", diff)
        self.worst(f"{what}_scale", scale)
        return diff

    def worst(self, key: str, value: float, lowest: bool = False) -> None:
        old = self.figures.get(key)
        if old is None or (value < old if lowest else value > old):
            self.figures[key] = float(value)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(n)

    def to_json(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance.to_json(), "sizes": [list(s) for s in self.sizes],
                **{k: round(v, 9) for k, v in self.figures.items()}, **self.counts}


# ---- graphs ------------------------------------------------------------------------------

def check_opset(opset: int) -> int:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as max_opset

    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"opset must be a whole number from {MIN_OPSET} to {max_opset} "
                          f"(the TorchScript exporter's range), got {opset!r}.")
    return opset


def export_graph(module: Any, args: tuple, folder: Path, key: str, input_names: Sequence[str],
                 output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]], opset: int,
                 external_data: bool | None = None) -> GraphFile:
    """Trace ``module`` on ``args`` into ``folder/<key>.onnx`` (+ ``<key>.onnx.data`` when large).

    ``external_data``: None decides by size (protobuf's 2 GiB limit), True/False forces it.
    """
    import onnx
    import torch

    from .optimize import current_fusion, fuse_transformer, fusion_enabled, is_transformer
    from .plain import plain_attention

    module.eval()
    scratch = folder / f".{key}.scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    traced_path = scratch / f"{key}.onnx"
    try:
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode(False), torch.no_grad(), \
                _mha_slow_path(), plain_attention(module):
            warnings.simplefilter("always")
            torch.onnx.export(module, args, str(traced_path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        # Tracer warnings flag values baked in as constants; parity is what decides if they matter.
        for w in caught:
            log.debug("export %s: %s: %s", key, type(w.message).__name__, str(w.message).splitlines()[0][:200])
        # The exporter restores the training flag it found; a module traced while training would
        # come back training, so put it back in eval mode for the parity run that follows.
        module.eval()
        model = onnx.load(str(traced_path))  # pulls in any external tensors the exporter wrote
        optimization = None
        if fusion_enabled() and is_transformer(module):
            model, fused = fuse_transformer(model)
            optimization = {"level": current_fusion(), "fusions": fused}
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed on the {key} graph: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    target = folder / f"{key}.onnx"
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    use_external = size > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    data_name = f"{key}.onnx.data" if use_external else None
    onnx.save_model(model, str(target), save_as_external_data=use_external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(target))
    log.info("exported %s (%.1f MB of weights%s%s)", target.name, size / 1e6,
             f", external data {data_name}" if data_name else "",
             f", fused {optimization['fusions']}" if optimization else "")
    declared = {name for axes in dynamic_axes.values() for name in axes.values()}
    return GraphFile(key=key, file=target.name, external_data=data_name, inputs=_io(model.graph.input, declared),
                     outputs=_io(model.graph.output, declared), dynamic_axes=dict(dynamic_axes),
                     optimization=optimization)


@contextlib.contextmanager
def _mha_slow_path() -> Iterator[None]:
    """Trace ``nn.MultiheadAttention`` (torchvision's ViT) through its plain ops.

    In eval mode without grad it takes a fused fast path (``aten::_native_multi_head_attention``)
    that has no ONNX symbolic; the slow path computes the same attention from matmuls and softmax.
    Parity still compares the graph with the module as PyTorch serves it (fast path on).
    """
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _io(values: Any, declared: set[str]) -> list[TensorInfo]:
    """Name, dtype and shape of graph inputs/outputs: sizes, declared dynamic axes, "?" for the rest."""
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:  # the exporter names sizes it could not fold ("Addimage_embeddings_dim_2"): known only at run time
                dims.append(d.dim_param if d.dim_param in declared else "?")
        out.append(TensorInfo(v.name, str(np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))), dims))
    return out


def parity_session(path: Path) -> Any:
    """A CPU ONNX Runtime session: parity is about the graph, and the CPU provider is the reference."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_images(seed: int, sizes: Sequence[tuple[int, int]] = PARITY_SIZES) -> list[np.ndarray]:
    """Fresh random RGB images with some structure (blobs and edges on noise), one per size.

    Plain noise gives detectors nothing to fire on; rectangles and discs of one (slightly
    textured) colour give seeded detectors (and real ones) boxes to compare.
    """
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:height, :width]
        for _ in range(4):
            color = rng.integers(0, 256, 3, dtype=np.uint8)
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            ry, rx = rng.integers(max(2, height // 10), max(3, height // 3)), rng.integers(max(2, width // 10),
                                                                                          max(3, width // 3))
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            if rng.random() < 0.5:
                inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            # textured, not flat: flat areas give neighbouring anchors bit-identical scores (exact ties)
            texture = rng.integers(-12, 13, (int(inside.sum()), 3))
            img[inside] = np.clip(color.astype(int) + texture, 0, 255).astype(np.uint8)
        images.append(img)
    return images


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)

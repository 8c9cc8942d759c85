"""int8 and float16 variants of an export, published only when they keep the float32 answers.

    vfm export efficientnet_lite0 --quantize int8 --calibration photos/   # static QDQ, per-channel
    vfm export efficientnet_lite0 --quantize int8                          # dynamic (weights only)
    vfm export tiny_cnn --dtype float16                                    # for GPUs

A variant lives next to the float32 export as its own model folder, ``NAME.int8`` or
``NAME.float16`` (``variant_folder``), with the same layout and a config.json that also records
``quantize`` / ``dtype``, the calibration and the agreement measured. It is made from the float32
graph the family exporter has just written and checked against PyTorch, in the same hidden work
folder, so a variant that fails its check is never published (``QuantizationRefused``).

The check compares the variant with the float32 graph, both on ONNX Runtime's CPU provider, on
real photos (``check_photos``: scikit-image's sample photos, or ``check_images=FOLDER``):
classifiers keep their top-1 class on at least ``min_agreement`` of the photos float32 is sure
about (its top-1 probability beats its top-2 by ``min_margin`` or more: a photo float32 itself
splits between "tabby" and "tiger cat" has no top-1 answer to keep); the agreement on every
photo is recorded too.

Why static QDQ for CNNs (measured, efficientnet_lite0, this 2-core CPU): dynamic quantization
turns convolutions into ConvInteger, which ran 9x slower than float32 and kept 5 of 19 top-1
answers; static QDQ with per-channel weights ran in half the float32 time.

What static int8 quantizes (``quantize_graph``): every op ONNX Runtime has an int8 kernel for in a
graph made of convolutions, batch norm, ReLU and residual adds (resnet, efficientnet); only the
weight-carrying ops (Conv, MatMul, Gemm) in a graph that also holds ops with no int8 kernel
(``FLOAT_ONLY_OPS``: LayerNorm, GELU's Erf, softmax, fused attention), since quantizing the adds
and multiplies between those only adds a quantize/dequantize pair around each (convnext_tiny's
GELU became five int8 and float ops: 0.76 of float32's time against 0.48). MatMul outputs stay
float either way, so ONNX Runtime runs each as one MatMulIntegerToFloat with its bias added,
instead of an int8 MatMul whose output is dequantized at once for the float op after it. A constant
per-channel scale after a linear layer (convnext's and DINOv2's layer scale) is folded into the layer's
weights and bias first, and small constants the exporter merged across nodes are unshared.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .common import ExportError, FamilyExport, GraphFile, Parity, ParityError, Tolerance, parity_images, parity_session

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
DTYPE_CHOICES = ("float32", "float16")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# fp16 against fp32: ~3 significant digits per op, compounded over the network
FLOAT16_TOLERANCE = Tolerance(atol=5e-2, rtol=2e-2)
MIN_SURE_PHOTOS = 5
# the share of answers a variant must keep: top-1 classes of sure photos, clear boxes, masks (task_checks)
MIN_AGREEMENT = {"top1": 0.99, "boxes": 0.95, "masks": 0.95}
CHECK_FACES = 60        # detectors are checked on lfw_subset's first 60 faces (face_mosaics)

# scikit-image's sample photos (real photographs; drawings, synthetic and microscopy-only data left out).
# Grayscale ones are given as RGB, as a camera's grey photo would be decoded.
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "moon", "brick", "grass", "gravel", "clock", "page", "text",
                  "cell", "stereo_motorcycle")


class QuantizationRefused(ParityError):
    """The int8/float16 variant changes the answers past the limits: nothing is published."""


@dataclass(frozen=True)
class VariantOptions:
    """How to make a variant. ``quantize``: "int8" or None; ``dtype``: "float32" or "float16".

    int8: ``calibration`` (a folder of images) makes it static QDQ (activations uint8, weights
    int8, ``per_channel`` weights), else dynamic. ``min_agreement``: the share of the sure photos
    whose top-1 class must stay (classifiers, default 0.99), of the clear boxes that must match
    (detectors, 0.95) or of the masks that must keep ``min_iou`` (SAM, 0.95); ``min_margin``: by
    how much float32's top-1 probability must beat its top-2 for a photo to be sure (a box's score
    its threshold, for a box to be clear); ``min_iou``: a matching box's IoU (default 0.7) or a
    kept mask's (0.9); ``check_images``: a folder of photos to check on instead of scikit-image's.
    """

    quantize: str | None = None
    dtype: str = "float32"
    calibration: Path | None = None
    per_channel: bool = True
    min_agreement: float | None = None
    min_margin: float = 0.1
    check_images: Path | None = None
    max_calibration_images: int = 500
    min_iou: float | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}.")
        if self.dtype not in DTYPE_CHOICES:
            raise ExportError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}.")
        if self.quantize and self.dtype != "float32":
            raise ExportError("give --quantize int8 or --dtype float16, not both.")
        if self.calibration is not None and not self.quantize:
            raise ExportError("--calibration is for --quantize int8.")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ExportError(f"min_agreement must be from 0 to 1, got {self.min_agreement!r}.")
        if not 0.0 <= self.min_margin < 1.0:
            raise ExportError(f"min_margin must be from 0 to below 1, got {self.min_margin!r}.")
        if self.min_iou is not None and not 0.0 < self.min_iou <= 1.0:
            raise ExportError(f"min_iou must be above 0 and at most 1, got {self.min_iou!r}.")
        for name in ("calibration", "check_images"):
            folder = getattr(self, name)
            if folder is not None:
                image_files(Path(folder), f"--{name.replace('_', '-')}")

    def agreement(self, task: str) -> float:
        """``min_agreement``, or the default of ``task`` ("top1", "boxes", "masks")."""
        return self.min_agreement if self.min_agreement is not None else MIN_AGREEMENT[task]

    @property
    def variant(self) -> str | None:
        """The folder suffix: "int8", "float16", or None for the plain float32 export."""
        return self.quantize or (self.dtype if self.dtype != "float32" else None)


def variant_folder(folder: str, variant: str | None) -> str:
    """``efficientnet_lite0`` + ``int8`` -> ``efficientnet_lite0.int8``."""
    return f"{folder}.{variant}" if variant else folder


def variant_of(quantize: str | None = None, dtype: str | None = None) -> str | None:
    """The variant a runner asks for (``quantize: int8``, or ``dtype: float16`` on the ONNX backend)."""
    return VariantOptions(quantize=quantize, dtype=dtype or "float32").variant


# ---- photos ----------------------------------------------------------------------------------

def image_files(folder: Path, what: str) -> list[Path]:
    """The image files directly in ``folder``, sorted; a one-line ``ExportError`` when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{what}: {folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ExportError(f"{what}: {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def read_folder(folder: Path, what: str, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    from ..images import InvalidImage, decode_image

    out = []
    for path in image_files(folder, what)[:limit]:
        try:
            out.append((path.name, decode_image(path.read_bytes())))
        except (OSError, InvalidImage) as exc:
            raise ExportError(f"{what}: {path} is not an image that can be read ({exc}).") from None
    return out


def skimage_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's sample photos, as RGB uint8 (both views of the stereo pair)."""
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        value = getattr(skimage.data, name)()
        arrays = list(value[:2]) if isinstance(value, tuple) else [value]
        for i, array in enumerate(arrays):
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            out.append((name if len(arrays) == 1 else f"{name}_{i}", np.ascontiguousarray(array[..., :3])))
    return out


def face_mosaics(start: int = 0, stop: int = CHECK_FACES, tiles: int = 20,
                 side: int = 80) -> list[tuple[str, np.ndarray]]:
    """Real faces ``start:stop`` of scikit-image's ``lfw_subset`` (Labeled Faces in the Wild: 100 faces,
    25x25 grey crops), enlarged to ``side`` pixels and tiled 5 across, ``tiles`` faces a mosaic: photos
    with many faces for detectors' checks (the sample photos hold two). The check uses the first
    ``CHECK_FACES``; the rest are left for calibration."""
    import skimage.data
    from PIL import Image

    faces = skimage.data.lfw_subset()[start:min(stop, 100)]  # the first 100 are faces, the rest are not
    out = []
    for k in range(0, len(faces), tiles):
        crops = [np.asarray(Image.fromarray((f * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR))
                 for f in faces[k:k + tiles]]
        rows = [np.concatenate(crops[r:r + 5], axis=1) for r in range(0, len(crops), 5)]
        grey = np.concatenate(rows, axis=0)
        out.append((f"lfw_faces_{start + k}-{start + k + len(crops) - 1}", np.ascontiguousarray(np.stack([grey] * 3, axis=-1))))
    return out


def views(photos: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Each photo, mirrored, and its centre 70%: three framings a user could send of one scene."""
    out = []
    for name, image in photos:
        h, w = image.shape[:2]
        dy, dx = int(h * 0.15), int(w * 0.15)
        out += [(name, image), (f"{name}:mirrored", np.ascontiguousarray(image[:, ::-1])),
                (f"{name}:centre", np.ascontiguousarray(image[dy:h - dy, dx:w - dx]))]
    return out


def check_photos(options: VariantOptions, with_views: bool = True,
                 faces: bool = False) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(description, [(name, image)]) of the photos a variant is checked on (``views`` of each unless
    ``with_views`` is False); ``faces`` adds scikit-image's 100 LFW faces as mosaics (``face_mosaics``)."""
    frame = views if with_views else list
    if options.check_images is not None:
        photos = read_folder(options.check_images, "--check-images")
        return f"{options.check_images} ({len(photos)} photos)", frame(photos)
    photos = skimage_photos()
    described = f"scikit-image sample photos ({len(photos)} photos: {', '.join(n for n, _ in photos)})"
    if faces:
        mosaics = face_mosaics()
        photos += mosaics
        described += f" and {len(mosaics)} mosaics of 20 of its first {CHECK_FACES} LFW faces"
    return described, frame(photos)


# ---- making the variant -------------------------------------------------------------------

def make_variant(version: Path, result: FamilyExport, spec: Any, options: VariantOptions) -> dict[str, Any]:
    """Turn the float32 graph(s) in ``version`` into the variant, in place, and check it.

    Returns what config.json records about it; raises ``QuantizationRefused`` (nothing to publish)
    when the answers change past the limits.
    """
    if result.kind not in ("classifier", "vit"):
        raise ExportError(f"--quantize/--dtype float16 exports are checked on classifiers' top-1 answers, detectors' "
                          f"boxes and SAM's masks; {spec.name!r} is a {result.kind} export, which has no such check.")
    if result.kind == "vit" and not (result.runtime or {}).get("has_classifier"):
        raise ExportError(f"{spec.name!r} has no classifier head: its int8/float16 answers cannot be checked on "
                          "top-1 classes.")
    graph = result.graphs[0]
    float_path = version / f".{graph.key}.float32.onnx"
    shutil.copyfile(version / graph.file, float_path)
    try:
        if options.quantize:
            made = quantize_graph(float_path, version / graph.file, spec, options)
        else:
            made = float16_graph(float_path, version / graph.file, options)
        try:
            made["check"] = check_classifier(float_path, version / graph.file, spec, options)
        except CpuCannotRun as exc:  # float16 kernels this CPU build lacks: checked on what it declares
            made["check"] = {"shapes_only": str(exc), **check_declared_io(float_path, version / graph.file)}
    finally:
        float_path.unlink(missing_ok=True)
    _refresh_io(graph, version)
    return made


WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
# ops ONNX Runtime's CPU provider runs in float only (standard and com.microsoft, before or after its fusions)
FLOAT_ONLY_OPS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Erf",
                            "Gelu", "BiasGelu", "FastGelu", "Softmax", "Attention", "MultiHeadAttention"})


def quantize_graph(src: Path, dst: Path, spec: Any, options: VariantOptions,
                   feeds: Sequence[dict[str, np.ndarray]] | None = None,
                   op_types: Sequence[str] | None = None) -> dict[str, Any]:
    """int8 ``src`` -> ``dst``: static QDQ when ``options.calibration`` is given (calibrated on ``feeds``, the
    graph's recorded inputs, else on the calibration images preprocessed as ``spec`` does), else dynamic.
    ``op_types``: the op types to quantize (default: ``WEIGHT_OPS`` in a graph that holds ``FLOAT_ONLY_OPS``,
    else all that onnxruntime.quantization knows; see the module's text)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..images import preprocess_batch

    prepared = dst.with_name(f".{dst.stem}.prepared.onnx")
    # ONNX shape inference does not type what com.microsoft kernels (the fused attention) output, nor
    # the MatMul after them (SAM's encoder); every float graph exported here is float32
    untyped = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    try:
        # shape inference and ONNX Runtime's own fusions first, as onnxruntime.quantization advises
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))  # written by quant_pre_process as one file, no external data
        if _unshare_small_initializers(model.graph) + _fold_channel_scales(model.graph):
            onnx.save(model, str(prepared))
        batched = _batched_constant_matmuls(model.graph)
        if op_types is None and {n.op_type for n in model.graph.node} & FLOAT_ONLY_OPS:
            op_types = WEIGHT_OPS
        del model
        if options.calibration is None:
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=options.per_channel,
                             op_types_to_quantize=list(op_types) if op_types else None, extra_options=untyped,
                             nodes_to_exclude=batched)
            return {"quantize": {"dtype": "int8", "method": "dynamic", "per_channel": options.per_channel,
                                 "op_types": list(op_types) if op_types else "all",
                                 "weights": "int8", "activations": "uint8, range computed per run",
                                 "tool": "onnxruntime.quantization.quantize_dynamic"}}
        recorded = feeds is not None
        if feeds is None:
            photos = read_folder(options.calibration, "--calibration", options.max_calibration_images)
            input_name = parity_session(src).get_inputs()[0].name
            images = len(photos)
            feeds = [{input_name: image} for _, image in photos]  # preprocessed as read (below)
        else:
            images = len(read_folder(options.calibration, "--calibration", options.max_calibration_images))

        class Reader(CalibrationDataReader):
            """One recorded or preprocessed input per call, as the runner feeds the graph."""

            def __init__(self) -> None:
                self.items: Iterator[dict[str, np.ndarray]] = _progress(feeds, f"calibrating {src.stem}")

            def get_next(self) -> dict[str, np.ndarray] | None:
                item = next(self.items, None)
                if item is None or recorded:
                    return item
                return {name: preprocess_batch([image], spec.preprocess) for name, image in item.items()}

        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=options.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types) if op_types else None,
                        extra_options={**untyped, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
                        nodes_to_exclude=batched)
        return {"quantize": {"dtype": "int8", "method": "static", "format": "QDQ", "per_channel": options.per_channel,
                             "op_types": list(op_types) if op_types else "all", "matmul_outputs": "float32",
                             "weights": "int8", "activations": "uint8", "calibrate_method": "MinMax",
                             "tool": "onnxruntime.quantization.quantize_static"},
                "calibration": {"folder": str(Path(options.calibration).expanduser().resolve()),
                                "images": images}}
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                          ) from exc
    finally:
        prepared.unlink(missing_ok=True)


SHARED_COPY_LIMIT = 1 << 16  # elements


def _unshare_small_initializers(graph: Any) -> int:
    """Give every node its own copy of a small constant it shares with other nodes (in place); returns how many
    copies were made. The exporter merges equal initializers: random-init networks' all-zero biases become one
    tensor read by convolutions, MatMuls and LayerNorms alike, which the quantizer then stores as one int32 bias
    dequantized at run time for the float ops (convnext_tiny: 41 DequantizeLinear nodes a run, ~8% of its int8
    time at batch 1). Large shared tensors (tied weights) stay shared."""
    import onnx

    small = {t.name: t for t in graph.initializer if 0 < int(np.prod(t.dims)) <= SHARED_COPY_LIMIT}
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in small:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(small[name])
                copy.name = f"{name}/copy{copies}"
                graph.initializer.append(copy)
                node.input[k] = copy.name
                copies += 1
            seen.add(name)
    return copies


def _fold_channel_scales(graph: Any) -> int:
    """Fold a constant per-channel scale after a linear layer (``MatMul(x, W) + b`` then ``* g``: convnext's and
    DINOv2's layer scale) into the layer, ``W * g`` and ``b * g``, and drop the multiply (in place); the
    per-channel int8 weights take the scale exactly. Returns how many were folded."""
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    dropped, renamed = set(), {}
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2 or mul.output[0] in outputs:
            continue
        scale_name = next((i for i in mul.input if i in constants), None)
        data = next((i for i in mul.input if i not in constants), None)
        add = made_by.get(data or "")
        if scale_name is None or add is None or add.op_type != "Add" or readers.get(data) != 1 or data in outputs:
            continue
        bias_name = next((i for i in add.input if i in constants), None)
        matmul = made_by.get(next((i for i in add.input if i not in constants), ""))
        if bias_name is None or matmul is None or matmul.op_type != "MatMul" or readers.get(matmul.output[0]) != 1:
            continue
        weight_name = matmul.input[1]
        if weight_name not in constants or readers.get(weight_name) != 1 or readers.get(bias_name) != 1 \
                or readers.get(scale_name) != 1:
            continue
        scale, bias = numpy_helper.to_array(constants[scale_name]), numpy_helper.to_array(constants[bias_name])
        weight = numpy_helper.to_array(constants[weight_name])
        if weight.ndim != 2:
            continue
        channels = weight.shape[1]
        # the scale's last axis is the channels and every other axis 1: [C], [1, 1, 1, C]
        if bias.shape != (channels,) or scale.shape[-1:] != (channels,) or scale.size != channels:
            continue
        g = scale.reshape(channels).astype(weight.dtype)
        constants[weight_name].CopyFrom(numpy_helper.from_array(weight * g, weight_name))
        constants[bias_name].CopyFrom(numpy_helper.from_array(bias * g, bias_name))
        renamed[mul.output[0]] = add.output[0]
        dropped.add(id(mul))
    if not dropped:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:  # the scales folded away
        graph.initializer.remove(t)
    return len(dropped)


def _batched_constant_matmuls(graph: Any) -> list[str]:
    """MatMuls whose constant input is not a 2-D weight (SAM's relative-position tables, ``[h, H, k]``):
    ONNX Runtime's integer MatMul takes no zero point for those, and they are no layer's weights."""
    shapes = {t.name: len(t.dims) for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(shapes.get(i, 2) != 2 for i in n.input)]


def float16_graph(src: Path, dst: Path, options: VariantOptions) -> dict[str, Any]:
    """Weights and compute in float16; inputs and outputs stay float32 (``keep_io_types``), so the
    runners and the service feed it as they feed the float32 graph."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(_detach_outputs(onnx.load(str(src))), keep_io_types=True)
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"dtype": "float16", "float16": {"keep_io_types": True,
                                            "tool": "onnxconverter_common.float16.convert_float_to_float16"}}


def _detach_outputs(model: Any) -> Any:
    """Give each graph output that other nodes also read (a classifier's ``features``) an Identity of
    its own: ``keep_io_types`` casts the output itself back to float32, and the float16 nodes
    reading it would then get float32 ("Gemm bound to different types")."""
    from onnx import helper

    outputs = {o.name for o in model.graph.output}
    read = {name for node in model.graph.node for name in node.input} & outputs
    for node in list(model.graph.node):
        for i, name in enumerate(node.output):
            if name in read:
                inner = f"{name}__float16_inner"
                node.output[i] = inner
                for consumer in model.graph.node:
                    for j, used in enumerate(consumer.input):
                        if used == name:
                            consumer.input[j] = inner
                model.graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}__output"))
    return model


def _refresh_io(graph: GraphFile, version: Path) -> None:
    """The graph's IO as the variant declares it (the same names; float32 kept at the boundary)."""
    import onnx

    from .common import _io

    model = onnx.load(str(version / graph.file), load_external_data=False)
    declared = {name for axes in graph.dynamic_axes.values() for name in axes.values()}
    graph.inputs, graph.outputs = _io(model.graph.input, declared), _io(model.graph.output, declared)


# ---- the check --------------------------------------------------------------------------

def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def check_classifier(float_path: Path, variant_path: Path, spec: Any, options: VariantOptions) -> dict[str, Any]:
    """Top-1 agreement of the variant with float32 on real photos; raise when it is too low."""
    from ..images import preprocess_batch

    described, photos = check_photos(options)
    reference, variant = parity_session(float_path), _session(variant_path, options)
    input_name = reference.get_inputs()[0].name
    ref_logits, got_logits = [], []
    for chunk in _progress([photos[i:i + 8] for i in range(0, len(photos), 8)], "checking", unit="batch"):
        batch = preprocess_batch([image for _, image in chunk], spec.preprocess)
        ref_logits.append(reference.run(["logits"], {input_name: batch})[0])
        got_logits.append(variant.run(["logits"], {input_name: batch})[0])
    ref, got = np.concatenate(ref_logits).astype(np.float64), np.concatenate(got_logits).astype(np.float64)
    if not np.isfinite(got).all():
        raise QuantizationRefused(f"the {options.variant} export of {spec.name} gives NaN/inf logits on real photos; "
                                  "it is not published.")
    probs = _softmax(ref)
    same = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] >= options.min_margin
    parity: dict[str, Any] = {}
    if options.dtype == "float16":  # gated on parity (any weights); the agreement is recorded
        parity = _float16_parity(reference, variant, input_name, spec)
    if sure.sum() < MIN_SURE_PHOTOS and options.quantize:
        raise QuantizationRefused(f"only {int(sure.sum())} of the {len(photos)} check photo views have a "
                                  f"float32 top-1 probability {options.min_margin:g} or more above the top-2 (at least "
                                  f"{MIN_SURE_PHOTOS} are needed: are the weights random?); "
                                  "give more photos (--check-images) or a lower --min-margin.")
    agreement = float(same[sure].mean()) if sure.any() else float("nan")
    min_agreement = options.agreement("top1")
    changed = [name for (name, _), s, ok in zip(photos, sure, same) if s and not ok]
    figures = {"photos": described, "views": len(photos), "sure_views": int(sure.sum()),
               "min_margin": options.min_margin, "min_agreement": min_agreement,
               "top1_agreement": None if np.isnan(agreement) else round(agreement, 4),
               "top1_agreement_all_views": round(float(same.mean()), 4),
               "changed": changed,
               "logits_max_abs_diff": round(float(np.abs(got - ref).max()), 6),
               "prob_max_abs_diff": round(float(np.abs(_softmax(got) - probs).max()), 6), **parity}
    log.info("%s %s check: %s", spec.name, options.variant, figures)
    if options.quantize and agreement < min_agreement:
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        hint = (" Calibrate it (--calibration FOLDER: static int8)." if options.quantize and options.calibration is None
                else "")
        raise QuantizationRefused(f"the {options.variant} export of {spec.name} keeps the float32 top-1 class on "
                                  f"{agreement:.1%} of {int(sure.sum())} sure photo views (needs "
                                  f"{min_agreement:.1%}; changed: {shown}); it is not published.{hint}")
    return figures


class CpuCannotRun(ExportError):
    """ONNX Runtime's CPU provider has no kernel for some float16 op of the graph."""


def _session(path: Path, options: VariantOptions) -> Any:
    """The variant on the CPU provider; a float16 graph whose ops the CPU build lacks is checked on shapes only."""
    try:
        return parity_session(path)
    except Exception as exc:  # onnxruntime's NOT_IMPLEMENTED for an fp16 kernel the CPU build lacks
        if options.dtype != "float16":
            raise
        raise CpuCannotRun(f"ONNX Runtime's CPU provider cannot run the float16 graph "
                           f"({str(exc).splitlines()[0][:200]}); its values can only be checked on a GPU") from exc


def check_declared_io(float_path: Path, variant_path: Path) -> dict[str, Any]:
    """The variant passes ONNX's checker and strict shape inference, and declares the float32 graph's
    inputs and outputs (names, dtypes, shapes): what can be checked without running it."""
    import onnx

    def io(path: Path) -> list[tuple[str, int, list[Any]]]:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in list(model.graph.input) + list(model.graph.output)]

    try:
        onnx.checker.check_model(str(variant_path))
        want, got = io(float_path), io(variant_path)
    except Exception as exc:
        raise ParityError(f"the float16 graph fails ONNX's checks: {str(exc).splitlines()[0][:300]}") from exc
    if want != got:
        raise ParityError(f"the float16 graph declares inputs/outputs {got}, not the float32 graph's {want}.")
    return {"declared_io": "same as float32", "io": [name for name, _, _ in got]}


def _float16_parity(reference: Any, variant: Any, input_name: str, spec: Any) -> dict[str, Any]:
    """float16 vs float32 logits on the random parity images, within ``FLOAT16_TOLERANCE``."""
    from ..images import preprocess_batch

    parity = Parity(FLOAT16_TOLERANCE)
    batch = preprocess_batch(parity_images(7), spec.preprocess)
    parity.tensor("logits", variant.run(["logits"], {input_name: batch})[0],
                  reference.run(["logits"], {input_name: batch})[0])
    return {"float16_parity": parity.to_json()}


def _progress(items: Sequence[Any], what: str, unit: str = "image") -> Iterator[Any]:
    from tqdm import tqdm

    return iter(tqdm(items, desc=what, unit=unit, leave=False, disable=None))

"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP API) over the models /v1 serves: the translation only.

A request's tensors become the images /v1 takes (``image``: encoded files as a ``BYTES`` tensor; ``pixels``: decoded
``UINT8`` [H,W,3] or [N,H,W,3]), its ``parameters`` the options /v1 parses (``options.py``, with the same limits),
and the replicas' answers become named output tensors:

- classify: ``labels`` BYTES, ``scores`` FP32, ``indices`` INT64, each [N,K] ([K] for one unbatched image);
- detect: ``boxes`` FP32 [D,4], ``scores`` FP32 [D], ``labels`` BYTES [D], ``indices`` INT64 [D] and ``image_index``
  INT64 [D] (which image of the batch each detection is on): the D detections of every image, image by image;
- embed: ``embedding`` FP32 [N,dim] ([dim] for one unbatched image);
- segment (SAM, one image): ``masks`` BYTES [M] (each a mask as JSON text: COCO RLE ``{"size", "counts"}``, or
  polygons with ``format: polygons``), ``masks_uint8`` UINT8 [M,H,W] (0/1; only when asked for), ``scores`` FP32
  [M], ``areas`` INT64 [M], ``boxes`` FP32 [M,4], ``prompt_index`` INT64 [M] (which of ``prompts`` made each
  mask) and ``image_id`` BYTES [1] (send it back as the ``image_id`` parameter, with no input, to prompt the
  cached embedding again). The prompts are /v1 segment's options as request parameters; parameters are scalars,
  so the list-valued ones (``points``, ``point_labels``, ``box``, ``prompts``) are JSON text, e.g.
  ``"points": "[[220, 140]]"``.

Which replica methods run follows the requested ``outputs`` (none requested: the model's predict task, or embed).
JSON ``BYTES`` elements of an input are base64 (an image is not UTF-8 text); with the binary tensor data extension
(``Inference-Header-Content-Length``) they are the raw bytes. Errors are the protocol's ``{"error": "..."}``.
The ingress (``ingress.py``) calls the replicas; nothing here does.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from .config import Limits
from .errors import ApiError, bad_request, payload_too_large

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
VERSION = "1"   # every served model has one version
# Request parameters the protocol or Triton's client reserve: never options.
RESERVED = frozenset({"binary_data_output", "binary_data", "binary_data_size", "timeout", "priority", "sequence_id",
                      "sequence_start", "sequence_end", "headers", "triton_enable_empty_final_response"})
NUMERIC = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64}
INPUTS = {"image": ("BYTES", [-1], "encoded image files (JPEG, PNG, ...), one per element; base64 in JSON"),
          "pixels": ("UINT8", [-1, -1, 3], "a decoded RGB image [H,W,3], or a batch [N,H,W,3]")}
OUTPUTS: dict[str, tuple[tuple[str, str, list[int]], ...]] = {
    "classify": (("labels", "BYTES", [-1, -1]), ("scores", "FP32", [-1, -1]), ("indices", "INT64", [-1, -1])),
    "detect": (("boxes", "FP32", [-1, 4]), ("scores", "FP32", [-1]), ("labels", "BYTES", [-1]),
               ("indices", "INT64", [-1]), ("image_index", "INT64", [-1])),
    "embed": (("embedding", "FP32", [-1, -1]),),
    "segment": (("masks", "BYTES", [-1]), ("masks_uint8", "UINT8", [-1, -1, -1]), ("scores", "FP32", [-1]),
                ("areas", "INT64", [-1]), ("boxes", "FP32", [-1, 4]), ("prompt_index", "INT64", [-1]),
                ("image_id", "BYTES", [1])),
}
PREDICT_TASKS = ("classify", "detect", "segment")
# SAM outputs answered only when asked for by name (a [M,H,W] tensor is large).
ON_REQUEST = frozenset({"masks_uint8"})
# SAM options whose values are lists: as request parameters (scalars) they are JSON text.
JSON_PARAMETERS = ("points", "point_labels", "box", "prompts")


# ---- the request ---------------------------------------------------------------------------

class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputTensor(_Closed):
    name: str
    shape: list[int] = Field(..., max_length=8)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestedOutput(_Closed):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(_Closed):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


@dataclass
class Inputs:
    """What a v2 request asks: its images, whether they came as a batch, its options and its outputs."""

    id: str | None
    images: list[bytes | np.ndarray]
    batched: bool                       # outputs keep a leading batch dimension
    options: dict[str, Any]
    outputs: list[RequestedOutput] | None
    binary_output: bool


def parse_infer_request(body: bytes, header_length: str | None, limits: Limits) -> Inputs:
    """The body of ``POST /v2/models/{name}/infer`` (JSON, or JSON then binary tensor data) as images and options;
    every problem is a 400 (413 for more images or pixels than the limits allow)."""
    json_part, binary = body, b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER}: {header_length!r} is not a number of bytes.") from None
        if not 0 <= size <= len(body):
            raise bad_request(f"{HEADER}: {size} is not within the body's {len(body)} bytes.")
        json_part, binary = body[:size], body[size:]
    try:
        data = json.loads(json_part)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"The inference request is not valid JSON: {exc}.") from None
    try:
        request = InferRequest.model_validate(data)
    except ValidationError as exc:
        raise bad_request("The inference request is not the protocol's: " + _problems(exc)) from None
    if len(request.inputs) > 1:
        raise bad_request(f"{len(request.inputs)} inputs; send one: `image` (BYTES) or `pixels` (UINT8).")
    if not request.inputs:   # a SAM prompt on a cached embedding names it (image_id) instead of sending the image
        if "image_id" not in request.parameters:
            raise bad_request("No inputs; send one: `image` (BYTES) or `pixels` (UINT8) (a SAM model also takes "
                              "no input and the `image_id` parameter of an image it has encoded).")
        if binary:
            raise bad_request(f"{len(binary)} bytes follow the JSON header but there is no input.")
        images: list[bytes | np.ndarray] = []
        batched = False
    else:
        tensor = request.inputs[0]
        values = _tensor_values(tensor, binary)
        images, batched = _images(tensor, values, limits)
    options = {k: v for k, v in request.parameters.items() if k not in RESERVED}
    flags = [("parameters.binary_data_output", request.parameters.get("binary_data_output", False))]
    flags += [(f"outputs[{o.name!r}].parameters.binary_data", o.parameters["binary_data"])
              for o in request.outputs or [] if "binary_data" in o.parameters]
    for where, flag in flags:
        if not isinstance(flag, bool):
            raise bad_request(f"{where}: must be true or false, not {flag!r}.")
    return Inputs(request.id, images, batched, options, request.outputs, flags[0][1])


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5]) + "."


def _flat(data: Any) -> list[Any]:
    """The elements of a JSON tensor's ``data``, flattened row-major (the protocol allows nested lists)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _tensor_values(tensor: InputTensor, binary: bytes) -> list[bytes] | np.ndarray:
    """The elements of the one input tensor: a list of bytes (BYTES) or a flat numpy array."""
    where = f"inputs[{tensor.name!r}]"
    if any(d < 0 for d in tensor.shape):
        raise bad_request(f"{where}: shape {tensor.shape} has a negative dimension.")
    count = math.prod(tensor.shape)
    if tensor.datatype != "BYTES" and tensor.datatype not in NUMERIC:
        raise bad_request(f"{where}: datatype {tensor.datatype!r} is not one of the protocol's "
                          f"({', '.join(['BYTES', *NUMERIC])}).")
    binary_size = tensor.parameters.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size != len(binary):
            raise bad_request(f"{where}: binary_data_size {binary_size!r} is not the {len(binary)} bytes that follow "
                              "the JSON header.")
        if tensor.data is not None:
            raise bad_request(f"{where}: give `data` or binary data (binary_data_size), not both.")
        return _from_binary(tensor, binary, count, where)
    if binary:
        raise bad_request(f"{len(binary)} bytes follow the JSON header but no input names them (binary_data_size).")
    if tensor.data is None:
        raise bad_request(f"{where}: no `data` (and no binary_data_size).")
    flat = _flat(tensor.data)
    if len(flat) != count:
        raise bad_request(f"{where}: {len(flat)} elements for shape {tensor.shape} ({count} elements).")
    if tensor.datatype == "BYTES":
        return [_b64(item, f"{where}.data[{i}]") for i, item in enumerate(flat)]
    if not all(isinstance(v, (int, float, bool)) for v in flat):
        raise bad_request(f"{where}: {tensor.datatype} data must be numbers.")
    dtype = NUMERIC[tensor.datatype]
    values = np.asarray(flat, dtype=np.float64) if flat else np.zeros(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if values.size and (np.any(values != np.round(values)) or values.min() < info.min or values.max() > info.max):
            raise bad_request(f"{where}: {tensor.datatype} data must be integers in [{info.min}, {info.max}].")
    return values.astype(dtype)


def _from_binary(tensor: InputTensor, raw: bytes, count: int, where: str) -> list[bytes] | np.ndarray:
    if tensor.datatype == "BYTES":   # each element: a 4-byte little-endian length, then the bytes
        items, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise bad_request(f"{where}: BYTES binary data ends inside an element's length.")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise bad_request(f"{where}: a BYTES element of {n} bytes runs past the binary data.")
            items.append(raw[at + 4:at + 4 + n])
            at += 4 + n
        if len(items) != count:
            raise bad_request(f"{where}: {len(items)} BYTES elements for shape {tensor.shape} ({count} elements).")
        return items
    dtype = np.dtype(NUMERIC[tensor.datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise bad_request(f"{where}: {len(raw)} bytes of binary data for shape {tensor.shape} of "
                          f"{tensor.datatype} ({count * dtype.itemsize} bytes).")
    return np.frombuffer(raw, dtype=dtype)


def _b64(item: Any, where: str) -> bytes:
    if not isinstance(item, str):
        raise bad_request(f"{where}: a BYTES element in JSON must be a base64 string, not {type(item).__name__}.")
    if item.startswith("data:"):
        item = item.partition(",")[2]
    try:
        return base64.b64decode("".join(item.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: not valid base64 (in JSON, BYTES elements carry the image base64; or send the "
                          "binary tensor data extension's raw bytes).") from None


def _images(tensor: InputTensor, values: list[bytes] | np.ndarray, limits: Limits,
            ) -> tuple[list[bytes | np.ndarray], bool]:
    where = f"inputs[{tensor.name!r}]"
    if tensor.name not in INPUTS:
        raise bad_request(f"{where}: no such input; the inputs are `image` (BYTES, encoded files) and `pixels` "
                          "(UINT8 [H,W,3] or [N,H,W,3]).")
    datatype = INPUTS[tensor.name][0]
    if tensor.datatype != datatype:
        raise bad_request(f"{where}: datatype {tensor.datatype}; `{tensor.name}` is {datatype}.")
    shape = tensor.shape
    if tensor.name == "image":
        if len(shape) != 1 or shape[0] < 1:
            raise bad_request(f"{where}: shape {shape}; `image` is [N], one encoded file per element (N >= 1).")
        images: list[bytes | np.ndarray] = list(values)
        batched = True
    else:
        if len(shape) not in (3, 4) or shape[-1] != 3 or min(shape) < 1:
            raise bad_request(f"{where}: shape {shape}; `pixels` is [H,W,3] or [N,H,W,3] RGB (every dimension >= 1).")
        batched = len(shape) == 4
        height, width = shape[-3], shape[-2]
        if height * width > limits.max_pixels:
            raise payload_too_large(f"{where}: {height}x{width} pixels is over the limit of {limits.max_pixels}.",
                                    type="too_many_pixels")
        array = np.asarray(values).reshape(shape if batched else [1, *shape])
        images = [np.ascontiguousarray(a) for a in array]
    if len(images) > limits.max_images_per_request:
        raise payload_too_large(f"{where}: {len(images)} images; this service takes at most "
                                f"{limits.max_images_per_request} per request (limits.max_images_per_request).",
                                type="too_many_images")
    return images, batched


# ---- which replica methods answer ------------------------------------------------------------

def output_names(tasks: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Output name -> the task that makes it, for a model that does ``tasks``."""
    out: dict[str, str] = {}
    for task in tasks:
        if task in OUTPUTS and (task == "embed" or task == predict_task(tasks)):
            out.update({name: task for name, _, _ in OUTPUTS[task]})
    return out


def predict_task(tasks: list[str] | tuple[str, ...]) -> str | None:
    return next((t for t in PREDICT_TASKS if t in tasks), None)


def plan(model: str, tasks: list[str] | tuple[str, ...], outputs: list[RequestedOutput] | None) -> list[str]:
    """The tasks to run: those whose outputs are requested; none requested: predict, or embed for an embedder."""
    available = output_names(tasks)
    if not outputs:
        return [predict_task(tasks) or "embed"]
    wanted = []
    for output in outputs:
        if output.name not in available:
            raise bad_request(f"Model {model!r} has no output {output.name!r}; its outputs: "
                              f"{', '.join(available)}.")
        wanted.append(available[output.name])
    return list(dict.fromkeys(wanted))


# ---- the answer --------------------------------------------------------------------------------

@dataclass
class Tensor:
    name: str
    datatype: str
    value: np.ndarray       # dtype object (bytes) for BYTES


def output_tensors(task: str, results: list[dict[str, Any]], batched: bool) -> list[Tensor]:
    """A task's replica answers (one per image, as /v1 answers them) as the protocol's named tensors."""
    if task == "classify":
        labels = np.array([[p["label"].encode() for p in r["predictions"]] for r in results], dtype=object)
        scores = np.array([[p["score"] for p in r["predictions"]] for r in results], dtype=np.float32)
        indices = np.array([[p["index"] for p in r["predictions"]] for r in results], dtype=np.int64)
        k = len(results[0]["predictions"])
        arrays = [a.reshape(len(results), k) for a in (labels, scores, indices)]
        if not batched:
            arrays = [a[0] for a in arrays]
        return [Tensor("labels", "BYTES", arrays[0]), Tensor("scores", "FP32", arrays[1]),
                Tensor("indices", "INT64", arrays[2])]
    if task == "detect":
        found = [(i, d) for i, r in enumerate(results) for d in r["detections"]]
        return [Tensor("boxes", "FP32", np.array([d["box"] for _, d in found], dtype=np.float32).reshape(-1, 4)),
                Tensor("scores", "FP32", np.array([d["score"] for _, d in found], dtype=np.float32)),
                Tensor("labels", "BYTES", np.array([d["label"].encode() for _, d in found], dtype=object)),
                Tensor("indices", "INT64", np.array([d["index"] for _, d in found], dtype=np.int64)),
                Tensor("image_index", "INT64", np.array([i for i, _ in found], dtype=np.int64))]
    if task == "embed":
        embedding = np.array([r["embedding"] for r in results], dtype=np.float32)
        return [Tensor("embedding", "FP32", embedding if batched else embedding[0])]
    raise ValueError(f"no v2 outputs for task {task!r}")


def segment_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Request parameters as /v1 segment's options: the list-valued ones arrive as JSON text."""
    out = dict(options)
    for name in JSON_PARAMETERS:
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = json.loads(value)
            except (ValueError, RecursionError):
                raise bad_request(f"parameters.{name}: {value[:80]!r} is not JSON; request parameters are scalars, "
                                  f"so `{name}` is JSON text, e.g. {_JSON_EXAMPLES[name]!r}.") from None
    return out


_JSON_EXAMPLES = {"points": "[[220, 140]]", "point_labels": "[1]", "box": "[10, 20, 200, 180]",
                  "prompts": '[{"points": [[220, 140]], "point_labels": [1]}, {"box": [10, 20, 200, 180]}]'}


def segment_tensors(answer: Mapping[str, Any], uint8: bool) -> list[Tensor]:
    """A SAM replica's answer (``segment``: per-prompt ``results``; ``segment_everything``: ``masks``) as tensors; every
    mask of every prompt in one [M,...] tensor, ``prompt_index`` saying whose. ``uint8``: decode the RLE masks too."""
    groups = [r["masks"] for r in answer["results"]] if "results" in answer else [answer["masks"]]
    found = [(i, m) for i, masks in enumerate(groups) for m in masks]
    height, width = answer["image_size"]["height"], answer["image_size"]["width"]
    texts = [json.dumps(m["rle"] if "rle" in m else m["polygons"], separators=(",", ":")).encode() for _, m in found]
    tensors = [Tensor("masks", "BYTES", np.array(texts, dtype=object).reshape(len(found))),
               Tensor("scores", "FP32", np.array([m["score"] for _, m in found], dtype=np.float32)),
               Tensor("areas", "INT64", np.array([m["area"] for _, m in found], dtype=np.int64)),
               Tensor("boxes", "FP32", np.array([m["bbox"] for _, m in found], dtype=np.float32).reshape(-1, 4)),
               Tensor("prompt_index", "INT64", np.array([i for i, _ in found], dtype=np.int64)),
               Tensor("image_id", "BYTES", np.array([answer["image_id"].encode()], dtype=object))]
    if uint8:
        from vfm.models.masks import decode_rle

        masks = np.zeros((len(found), height, width), dtype=np.uint8)
        for k, (_, m) in enumerate(found):
            masks[k] = decode_rle(m["rle"])
        tensors.insert(1, Tensor("masks_uint8", "UINT8", masks))
    return tensors


def _serialize(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in tensor.value.reshape(-1))
    return np.ascontiguousarray(tensor.value, dtype=np.dtype(NUMERIC[tensor.datatype]).newbyteorder("<")).tobytes()


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.value.reshape(-1)
    if tensor.datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in flat]
    return flat.tolist()


def infer_response(model: str, tensors: list[Tensor], inputs: Inputs, warnings: list[str]) -> Response:
    """The inference answer: the requested outputs (all, when none is named) in JSON, or a JSON header and their
    binary data where ``binary_data`` / ``binary_data_output`` asks for it."""
    by_name = {t.name: t for t in tensors}
    chosen = ([(by_name[o.name], o.parameters.get("binary_data", inputs.binary_output)) for o in inputs.outputs]
              if inputs.outputs else [(t, inputs.binary_output) for t in tensors])
    outputs, chunks = [], []
    for tensor, binary in chosen:
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.value.shape)}
        if binary:
            chunk = _serialize(tensor)
            chunks.append(chunk)
            out["parameters"] = {"binary_data_size": len(chunk)}
        else:
            out["data"] = _json_data(tensor)
        outputs.append(out)
    answer: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if inputs.id is not None:
        answer["id"] = inputs.id
    if warnings:
        answer["parameters"] = {"warnings": " ".join(warnings)}
    if not chunks:
        return JSONResponse(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER: str(len(header))})


# ---- metadata and errors -------------------------------------------------------------------------

def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "vfm", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, tasks: list[str], backend: str | None) -> dict[str, Any]:
    """Inputs and outputs as tensors (a model without classify, detect, segment or embed has none)."""
    available = output_names(tasks)
    outputs = [{"name": n, "datatype": d, "shape": s} for task in dict.fromkeys(available.values())
               for n, d, s in OUTPUTS[task]]
    inputs = [{"name": n, "datatype": d, "shape": s} for n, (d, s, _) in INPUTS.items()] if outputs else []
    return {"name": name, "versions": [VERSION], "platform": f"vfm_{backend or 'torch'}", "inputs": inputs,
            "outputs": outputs}


def error_response(exc: ApiError) -> JSONResponse:
    """The protocol's error answer ``{"error": "..."}``, with /v1's status and headers."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers or None)


def is_v2_path(path: str, root_path: str = "") -> bool:
    path = path[len(root_path):] if root_path and path.startswith(root_path) else path
    return path == "/v2" or path.startswith("/v2/")


def split_options(options: Mapping[str, Any], models: Mapping[str, type[BaseModel]]) -> dict[str, dict[str, Any]]:
    """The request's options for each task's options model; an option none of them takes goes to the first, whose
    parse then refuses it by name (with the close names)."""
    known = {field for model in models.values() for field in model.model_fields}
    first = next(iter(models))
    out = {task: {k: v for k, v in options.items() if k in model.model_fields} for task, model in models.items()}
    out[first].update({k: v for k, v in options.items() if k not in known})
    return out

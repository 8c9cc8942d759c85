"""What each route answers, as typed dicts whose JSON schemas document the 200 answers in the OpenAPI.

The ingress builds its answers as plain dicts (``ingress.py``, from the ``to_json()`` of
``vfm.models.results``); these types say exactly what those dicts hold: every field the service
writes, which ones it may leave out (``NotRequired``: absent, never ``null``), and which ones are
``null`` when unknown. Each is closed (``additionalProperties: false``), so a field the service
starts writing without documenting it here fails the schema conformance test
(``tests/integration/test_hardening_fuzz.py``). ``routes.ROUTES`` names each route's answer;
``api.py`` turns them into the OpenAPI.

They are ``TypedDict``s rather than ``BaseModel``s because a field that may be left out is left
out of the answer, not sent as ``null``: ``NotRequired`` says so in the schema, where a model's
default of ``None`` would document a ``null`` that never comes.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, with_config
from typing_extensions import NotRequired, TypedDict

CLOSED = ConfigDict(extra="forbid")

ModelName = Annotated[str, Field(description="the served model name (as in the path)")]
ImageId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the image bytes: SAM's cache key")]
Score = Annotated[float, Field(description="rounded to 6 decimals")]
Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1], original-image pixels")]
IntBox = Annotated[list[int], Field(min_length=4, max_length=4,
                                    description="[x0, y0, x1, y1] of the mask's pixels, x1/y1 exclusive")]
Point = Annotated[list[float], Field(min_length=2, max_length=2, description="[x, y], original-image pixels")]
Warnings = Annotated[list[str], Field(min_length=1, description="what the client should know about this answer, "
                                      "e.g. that the model runs with random weights; absent when there is none")]
MaskFormat = Literal["rle", "png", "polygons"]


# ---- pieces --------------------------------------------------------------------------------

@with_config(CLOSED)
class ImageSize(TypedDict):
    """The size of the image as sent (masks and coordinates are in its pixels)."""

    height: int
    width: int


@with_config(CLOSED)
class Label(TypedDict):
    """One class of a classification, best first."""

    index: int
    label: str
    score: Score


@with_config(CLOSED)
class Detection(TypedDict):
    """One detected object."""

    box: Box
    score: Score
    label: str
    index: Annotated[int, Field(description="the class index of `label`")]
    landmarks: NotRequired[Annotated[list[Point], Field(description="face detectors (mtcnn_faces): eyes, nose "
                                                                    "and mouth corners")]]


@with_config(CLOSED)
class Rle(TypedDict):
    """COCO run-length encoding (pycocotools' `mask.decode` reads it)."""

    size: Annotated[list[int], Field(min_length=2, max_length=2, description="[height, width]")]
    counts: Annotated[str, Field(description="COCO's compressed counts string")]


PngBase64 = Annotated[str, Field(description="a 1-bit PNG of the whole image, base64",
                                 json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/png"})]
Polygons = Annotated[list[list[float]], Field(description="outer contours, each a flat [x0, y0, x1, y1, ...] list")]


class _Mask(TypedDict):
    score: Annotated[float, Field(description="the decoder's predicted IoU")]
    area: Annotated[int, Field(description="pixels")]
    bbox: IntBox


@with_config(CLOSED)
class RleMask(_Mask):
    """A mask in `format: rle` (the default)."""

    rle: Rle


@with_config(CLOSED)
class PngMask(_Mask):
    """A mask in `format: png`."""

    png: PngBase64


@with_config(CLOSED)
class PolygonMask(_Mask):
    """A mask in `format: polygons`."""

    polygons: Polygons


Mask = Union[RleMask, PngMask, PolygonMask]


class _EverythingMask(_Mask):
    stability_score: Annotated[float, Field(description="IoU of the mask cut at logit +offset and -offset")]
    point: Annotated[Point, Field(description="the grid point that found it")]


@with_config(CLOSED)
class EverythingRleMask(_EverythingMask):
    """An object `mode: everything` found, in `format: rle`."""

    rle: Rle


@with_config(CLOSED)
class EverythingPngMask(_EverythingMask):
    """An object `mode: everything` found, in `format: png`."""

    png: PngBase64


@with_config(CLOSED)
class EverythingPolygonMask(_EverythingMask):
    """An object `mode: everything` found, in `format: polygons`."""

    polygons: Polygons


EverythingMask = Union[EverythingRleMask, EverythingPngMask, EverythingPolygonMask]


@with_config(CLOSED)
class PromptMasks(TypedDict):
    """The masks of one prompt of `prompts` (three with `multimask`, else one)."""

    masks: list[Mask]


# ---- inference -------------------------------------------------------------------------------

@with_config(CLOSED)
class ClassifyAnswer(TypedDict):
    """predict on a classifier: the `top_k` classes, best first."""

    model: ModelName
    predictions: list[Label]
    warnings: NotRequired[Warnings]


@with_config(CLOSED)
class DetectAnswer(TypedDict):
    """predict on a detector: the objects above `score_threshold`, best first."""

    model: ModelName
    detections: list[Detection]
    image_size: ImageSize
    warnings: NotRequired[Warnings]


PredictAnswer = Union[ClassifyAnswer, DetectAnswer]


@with_config(CLOSED)
class EmbedAnswer(TypedDict):
    """The image's feature vector."""

    model: ModelName
    normalized: Annotated[bool, Field(description="the `normalize` option: unit L2 norm")]
    embedding: list[float]
    dim: Annotated[int, Field(description="the length of `embedding`")]
    warnings: NotRequired[Warnings]


@with_config(CLOSED)
class EncodeAnswer(TypedDict):
    """SAM's image embedding is computed (or was already) and cached under `image_id`."""

    model: ModelName
    image_id: ImageId
    cached: Annotated[bool, Field(description="the embedding was in the cache already")]
    image_size: ImageSize
    warnings: NotRequired[Warnings]


class _Segmented(TypedDict):
    model: ModelName
    format: MaskFormat
    image_id: ImageId
    cached: Annotated[bool, Field(description="the embedding came from the cache (no encoder run)")]
    image_size: ImageSize
    warnings: NotRequired[Warnings]


@with_config(CLOSED)
class SegmentAnswer(_Segmented):
    """segment with one prompt (`points`/`point_labels`/`box`): its masks."""

    masks: list[Mask]


@with_config(CLOSED)
class SegmentPromptsAnswer(_Segmented):
    """segment with `prompts`: the masks of each prompt, in order."""

    results: list[PromptMasks]


@with_config(CLOSED)
class SegmentEverythingAnswer(_Segmented):
    """segment with `mode: everything`: every object found, largest first."""

    mode: Literal["everything"]
    masks: list[EverythingMask]
    points: Annotated[int, Field(description="grid points decoded")]


SegmentResult = Union[SegmentAnswer, SegmentPromptsAnswer, SegmentEverythingAnswer]


@with_config(CLOSED)
class SegmentedDetection(Detection):
    """A detection and the masks of its box."""

    masks: list[Mask]


@with_config(CLOSED)
class DetectSegmentAnswer(_Segmented):
    """detect-segment: the detector's detections, each with this SAM's masks for its box."""

    detector: Annotated[str, Field(description="the `detector` option")]
    detections: list[SegmentedDetection]


@lru_cache(maxsize=None)
def batch_answer(title: str, single: Any) -> Any:
    """The answer to a request with `images` (a list): one single-image answer per image, in order, under the
    single answer's own naming fields (`model`; a head's `head` and `backbone`)."""
    hints = getattr(single, "__annotations__", {})   # a Union (predict: classify or detect) has none
    naming = {"head": hints["head"], "backbone": hints["backbone"]} if "head" in hints else {"model": ModelName}
    answer = TypedDict(title, {**naming,
                               "results": Annotated[list[single], Field(description="the answer for each image of "
                                                                                    "`images`, in order")],
                               "warnings": NotRequired[Warnings]})
    answer.__doc__ = "The answer to several images (`images`): the single-image answer of each, in order."
    return with_config(CLOSED)(answer)


# ---- heads -----------------------------------------------------------------------------------

@with_config(CLOSED)
class HeadInfo(TypedDict):
    """A head of the heads folder; the fields after `reason` come from its head.json (absent when it did not
    load)."""

    name: str
    status: Literal["ready", "invalid"]
    backbone: Annotated[str | None, Field(description="the model whose features it classifies")]
    reason: NotRequired[Annotated[str, Field(description="why it did not load")]]
    head_type: NotRequired[str | None]
    labels: NotRequired[list[str] | None]
    feature_dim: NotRequired[int | None]
    metrics: NotRequired[Annotated[dict[str, Any] | None, Field(description="the evaluation recorded in head.json")]]


@with_config(CLOSED)
class HeadsAnswer(TypedDict):
    heads: list[HeadInfo]


@with_config(CLOSED)
class HeadsReloadAnswer(TypedDict):
    """The heads folder rescanned."""

    folder: str
    loaded: int
    invalid: int
    heads: list[HeadInfo]


@with_config(CLOSED)
class HeadPredictAnswer(TypedDict):
    """A fine-tuned head's classes, best first, over its backbone's features."""

    head: str
    backbone: Annotated[str, Field(description="the served model that computed the features")]
    predictions: list[Label]
    warnings: NotRequired[Warnings]


# ---- models ----------------------------------------------------------------------------------

@with_config(CLOSED)
class Preprocess(TypedDict):
    """How an image becomes the network's input."""

    size: Annotated[int | list[int], Field(description="square side, or [height, width]")]
    resize_mode: Literal["resize_center_crop", "resize", "longest_side", "none"]
    crop_pct: float
    mean: list[float]
    std: list[float]
    interpolation: Literal["bilinear", "bicubic"]


class _ModelFields(TypedDict):
    name: Annotated[str, Field(description="the served name")]
    model: Annotated[str, Field(description="the registry model it serves")]
    task: str | None
    tasks: Annotated[list[str], Field(description="what its routes can ask of it")]
    status: Literal["ready", "unavailable"]
    backend: str | None
    device: str | None
    input_size: Annotated[int | list[int] | None, Field(description="square side, or [height, width]")]
    weights: Annotated[str | None, Field(description="where its weights come from")]
    num_labels: int | None
    feature_dim: int | None
    reason: NotRequired[Annotated[str, Field(description="why it is unavailable, and what to do")]]


@with_config(CLOSED)
class ModelSummary(_ModelFields):
    """A configured model."""


@with_config(CLOSED)
class ModelsAnswer(TypedDict):
    models: list[ModelSummary]


@with_config(CLOSED)
class ModelDetail(_ModelFields):
    """A configured model, in full."""

    labels: list[str] | None
    preprocess: Preprocess | None
    weights_path: Annotated[str | None, Field(description="its weights on the replica's machine, once one answered")]
    description: str | None
    serving: Annotated[dict[str, Any], Field(description="its serving settings from the config")]


# ---- health ----------------------------------------------------------------------------------

@with_config(CLOSED)
class HealthAnswer(TypedDict):
    status: Literal["ok"]


@with_config(CLOSED)
class ModelState(TypedDict):
    status: Literal["ready", "unavailable", "not_ready"]
    reason: NotRequired[Annotated[str, Field(description="why it is not ready, and what to do")]]


@with_config(CLOSED)
class ReadyAnswer(TypedDict):
    """Readiness: 200 when every configured model serves, else 503 with the same body."""

    ready: bool
    models: dict[str, ModelState]
    waiting_for: NotRequired[Annotated[list[str], Field(description="models not ready yet that can become ready "
                                                                    "(loading, or a replica being replaced)")]]
    unavailable: NotRequired[Annotated[dict[str, str], Field(description="model -> reason, for models that cannot "
                                                                         "load without an operator's action")]]


class MetricsText(str):
    """The Prometheus text exposition format (`text/plain; version=1.0.0`), not JSON."""

    media_type = "text/plain"


# ---- errors ----------------------------------------------------------------------------------

@with_config(CLOSED)
class ErrorDetail(TypedDict):
    type: Annotated[str, Field(description="stable and machine-readable, e.g. unknown_model")]
    message: Annotated[str, Field(description="what went wrong and what to do")]


@with_config(CLOSED)
class ErrorAnswer(TypedDict):
    """Every error answer."""

    error: ErrorDetail


# ---- Open Inference Protocol v2 (/v2) ---------------------------------------------------------

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                   "FP64", "BYTES"]


@with_config(CLOSED)
class OipServerMetadata(TypedDict):
    """The server's metadata (Open Inference Protocol v2)."""

    name: str
    version: str
    extensions: Annotated[list[str], Field(description="protocol extensions: binary_tensor_data")]


@with_config(CLOSED)
class OipLive(TypedDict):
    """Liveness: 200 while the process lives."""

    live: bool


@with_config(CLOSED)
class OipReady(TypedDict):
    """Readiness: 200 when every model that can load here serves, else 503 with the same body (as /readyz)."""

    ready: bool


@with_config(CLOSED)
class OipModelReady(TypedDict):
    """A model's readiness: 200 when it serves, else 503 with the same body."""

    name: str
    ready: bool


@with_config(CLOSED)
class OipTensorMetadata(TypedDict):
    """A tensor a model takes or answers; -1: any size."""

    name: str
    datatype: Datatype
    shape: list[int]


@with_config(CLOSED)
class OipModelMetadata(TypedDict):
    """A model's metadata: send one of `inputs`, ask for any of `outputs` (none: all of its predict task's)."""

    name: str
    versions: list[str]
    platform: Annotated[str, Field(description="vfm_ and the backend (torch or onnx)")]
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]


@with_config(CLOSED)
class OipTensorParameters(TypedDict):
    """With the binary tensor data extension: the size of this tensor's data after the JSON header."""

    binary_data_size: int


@with_config(CLOSED)
class OipOutputTensor(TypedDict):
    """An output tensor: `data` row-major in JSON, or `parameters.binary_data_size` bytes of binary data."""

    name: str
    datatype: Datatype
    shape: list[int]
    data: NotRequired[list[Any]]
    parameters: NotRequired[OipTensorParameters]


@with_config(CLOSED)
class OipAnswerParameters(TypedDict):
    warnings: Annotated[str, Field(description="what the client should know, e.g. that the model runs with random "
                                               "weights")]


@with_config(CLOSED)
class OipInferAnswer(TypedDict):
    """The inference answer: the requested output tensors (all, when none was named)."""

    model_name: str
    model_version: str
    id: NotRequired[str]
    parameters: NotRequired[OipAnswerParameters]
    outputs: list[OipOutputTensor]


class OipInputTensor(TypedDict):
    """An input tensor: `image` BYTES [N] (base64 in JSON) or `pixels` UINT8 [H,W,3] / [N,H,W,3]."""

    name: Literal["image", "pixels"]
    shape: list[int]
    datatype: Datatype
    parameters: NotRequired[dict[str, Any]]
    data: NotRequired[Any]


class OipRequestedOutput(TypedDict):
    name: str
    parameters: NotRequired[dict[str, Any]]


class OipInferRequest(TypedDict):
    """The inference request (JSON; with the binary tensor data extension, this JSON then the tensors' bytes, its
    length in the Inference-Header-Content-Length header). `parameters` holds the options of /v1's routes."""

    id: NotRequired[str]
    parameters: NotRequired[dict[str, Any]]
    inputs: Annotated[list[OipInputTensor], Field(max_length=1, description="one input; none only for a SAM "
                                                   "model with the `image_id` parameter of an image it has encoded")]
    outputs: NotRequired[list[OipRequestedOutput]]


@with_config(CLOSED)
class OipErrorAnswer(TypedDict):
    """Every error answer of /v2 (the protocol's form); the status codes are /v1's."""

    error: Annotated[str, Field(description="what went wrong and what to do")]

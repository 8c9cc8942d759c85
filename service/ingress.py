"""The ingress deployment: what each route does, between HTTP (``api.py``) and the model replicas.

It holds one ``DeploymentHandle`` per served model, knows every configured model (the
unavailable ones too, with their reason), checks auth, options and limits, calls replicas with
the model's timeout, and maps Serve's overload and unavailability to 503 and timeouts to 504.
A 503 carries Retry-After when retrying can help (overloaded, a replica restarting); a model that
can never load here (planned ``unavailable``: missing weights, a refused checkpoint) answers 503
without it, and its message says what the operator must do.
Every handler gets its row of ``routes.ROUTES`` and takes the route's facts from it (model tasks,
options, image requirement, replica method); ``infer`` serves predict, embed and encode alike.
"""
from __future__ import annotations

import asyncio
import difflib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import oip
from .config import ServiceConfig
from .errors import (ApiError, Failure, bad_request, not_found, payload_too_large, timed_out, unauthorized,
                     unavailable)
from .heads import HeadCatalog
from .metrics import MetricsBuffer
from .options import parse_options
from .routes import Route
from .sam_cache import image_id_of
from .transport import parse_image_request, read_body

log = logging.getLogger(__name__)

# The ModelServer method that answers the segment route's `mode: everything` (its prompts go to route.replica_method).
EVERYTHING_REPLICA_METHOD = "segment_everything"


def request_id(request: Request) -> str:
    """The request's id: the client's X-Request-ID, else the one Serve's proxy made (it echoes it back)."""
    return request.headers.get("x-request-id", "")


@dataclass
class ModelEntry:
    """A configured model as the API shows it; ``runtime`` comes from a replica once it answers."""

    served: str
    registry: str
    status: str                         # ready | unavailable
    reason: str | None
    spec: dict[str, Any]
    serving: dict[str, Any]
    labels: list[str] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.get("tasks", []))

    @property
    def warnings(self) -> list[str]:
        """What every inference answer of this model carries: its answers are meaningless on random weights."""
        if str(self.serving.get("weights") or "").strip().lower() == "random":
            return [f"model {self.served!r} runs with random weights (weights: random): its answers are meaningless"]
        if self.spec.get("random_weights"):
            return [f"model {self.served!r} runs with random weights (a seeded test model, {self.registry}): its "
                    "answers are meaningless"]
        return []

    def summary(self) -> dict[str, Any]:
        preprocess = self.spec.get("preprocess") or {}
        out = {"name": self.served, "model": self.registry, "task": self.spec.get("task"), "tasks": self.tasks,
               "status": self.status, "backend": self.runtime.get("backend", self.serving.get("backend")),
               "device": self.runtime.get("device", self.serving.get("device")),
               "input_size": preprocess.get("size"), "weights": self.spec.get("weights"),
               "num_labels": self.spec.get("num_labels"), "feature_dim": self.spec.get("feature_dim")}
        if self.reason:
            out["reason"] = self.reason
        return out

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "labels": self.labels, "preprocess": self.spec.get("preprocess"),
                "weights_path": self.runtime.get("weights_path"), "description": self.spec.get("description"),
                "serving": self.serving}


class Ingress:
    """Built by ``app.py``; ``__serve_build_asgi_app__`` returns the FastAPI app of ``api.py``.

    Its route handlers are the ``handler`` names of ``routes.ROUTES``, called by that app."""

    async def __init__(self, cfg: ServiceConfig, models: dict[str, ModelEntry], handles: dict[str, Any], hub: Any):
        self.cfg = cfg
        self.limits = cfg.limits
        self.models = models
        self.handles = handles
        self.hub = hub
        self.metrics = MetricsBuffer(hub, cfg.metrics_flush_s)
        self.api_key = cfg.api_key()
        self.heads = HeadCatalog(cfg.heads_dir)
        if self.heads.folder.is_dir():
            await asyncio.to_thread(self.heads.reload)
        for name, entry in models.items():
            self.metrics.set("vfm_model_ready", (name,), 1 if entry.status == "ready" else 0)

    def __serve_build_asgi_app__(self) -> Any:
        from .api import build_http_app

        return build_http_app(self)

    # ---- plumbing ----------------------------------------------------------------------------
    def authorize(self, request: Request, scope: str | None) -> None:
        """``scope``: ``admin`` routes need the key when set; ``api`` routes when api_key_scope is ``all``."""
        if self.api_key is None or scope is None or (scope == "api" and self.cfg.api_key_scope != "all"):
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise unauthorized(f"This route needs the API key: send `Authorization: Bearer <key>` (the key is in "
                               f"the server's ${self.cfg.api_key_env}).")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise unauthorized("The API key is wrong.")

    def model(self, name: str, route: Route | None = None) -> ModelEntry:
        """The entry of a served model, ready, that does one of ``route``'s tasks (when a route is given)."""
        entry = self.models.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self.models), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise not_found("unknown_model", f"No model {name!r} is served.{hint} GET /v1/models lists them.")
        if route is not None and not set(route.tasks) & set(entry.tasks):
            raise bad_request(f"Model {name!r} has no {route.name} route: it does {', '.join(entry.tasks)}.",
                              type="unsupported_task")
        if entry.status != "ready":
            raise cannot_load(name, entry.reason)
        return entry

    async def call(self, name: str, method: str, *args: Any, image_id: str = "") -> Any:
        """Call a replica method with the model's timeout; Failures and Serve errors become ApiErrors.
        A SAM call passes its ``image_id``: the SAM's router (``sam_routing.py``) sends every call for one id to
        the replica that holds its embedding."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        timeout = self.cfg.timeout_for(name)
        handle = self.handles[name]
        if image_id:
            handle = handle.options(multiplexed_model_id=image_id)
        response = getattr(handle, method).remote(*args)

        async def wait() -> Any:
            return await response

        try:
            result = await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise timed_out(f"Model {name!r} did not answer within {timeout:g}s; retry later or with a smaller "
                            "image.") from None
        except BackPressureError:
            raise unavailable("overloaded", f"Model {name!r} has too many requests queued; retry after "
                              f"{self.cfg.retry_after_s}s.", self.cfg.retry_after_s) from None
        except (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError) as exc:
            raise unavailable("model_unavailable", f"Model {name!r} has no healthy replica right now "
                              f"({type(exc).__name__}).", self.cfg.retry_after_s) from None
        if isinstance(result, Failure):
            error = ApiError.from_failure(result)
            if error.status == 503:
                error.headers["Retry-After"] = str(self.cfg.retry_after_s)
            raise error
        return result

    async def image_arg(self, name: str, data: bytes, where: str = "") -> bytes | np.ndarray:
        """What a replica gets: the bytes, or the decoded array when the model decodes at the ingress (an error then
        names ``where``, e.g. ``images[3]``)."""
        if self.cfg.models[name].decode_in == "replica":
            return data
        from vfm.models import ImageLimits, InvalidImage, decode_image

        limits = ImageLimits(max_bytes=self.limits.max_body_bytes, max_pixels=self.limits.max_pixels)
        try:
            return await asyncio.to_thread(decode_image, data, limits)
        except InvalidImage as exc:
            raise ApiError(exc.status, exc.code, f"{where}: {exc}" if where else str(exc)) from None

    async def image_args(self, name: str, images: list[bytes]) -> list[bytes | np.ndarray]:
        return [await self.image_arg(name, data, f"images[{i}]") for i, data in enumerate(images)]

    def warned(self, answer: dict[str, Any], *names: str) -> dict[str, Any]:
        """``answer`` with the ``warnings`` of the models that made it (none: no field)."""
        warnings = [w for name in dict.fromkeys(names) if name in self.models for w in self.models[name].warnings]
        return {**answer, "warnings": warnings} if warnings else answer

    async def runtime_info(self, entry: ModelEntry) -> None:
        """Fill backend/device/labels from a replica the first time one answers."""
        if entry.runtime or entry.status != "ready":
            return
        info = await self.call(entry.served, "info")
        entry.runtime = {k: info.get(k) for k in ("backend", "device", "weights_path")}
        entry.labels = info.get("labels")

    # ---- routes ------------------------------------------------------------------------------
    async def healthz(self, route: Route, request: Request) -> dict[str, Any]:
        return {"status": "ok"}

    async def readyz(self, route: Route, request: Request) -> Response:
        """Ready when every model that can load here serves. A model that can never load without an operator
        (planned ``unavailable``) is listed under ``unavailable`` and does not hold readiness back: restarting the
        service would not fix it, and the other models serve. ``waiting_for`` names the models still loading or
        restarting; only then is it a 503, with Retry-After."""
        states: dict[str, dict[str, Any]] = {}
        replicas = await self._running_replicas()

        async def probe(entry: ModelEntry) -> None:
            state: dict[str, Any] = {"status": entry.status}
            running, serve_status = (replicas or {}).get(entry.served, (1, ""))
            if entry.status == "ready" and running < 1:  # e.g. its process died and Serve is starting another
                state = {"status": "not_ready", "reason": f"no replica of {entry.served!r} is running (Serve: "
                         f"{serve_status}); Serve replaces failed replicas, retry shortly."}
            elif entry.status == "ready":
                try:
                    await asyncio.wait_for(self.runtime_info(entry), 5.0)
                except (ApiError, asyncio.TimeoutError) as exc:
                    state = {"status": "not_ready", "reason": getattr(exc, "message", "") or "no replica answered"}
            else:
                state["reason"] = entry.reason
            states[entry.served] = state

        await asyncio.gather(*(probe(e) for e in self.models.values()))
        states = {name: states[name] for name in self.models}  # config order, not the order probes finished
        waiting_for = [name for name, state in states.items() if state["status"] == "not_ready"]
        never = {name: entry.reason or "" for name, entry in self.models.items() if entry.status != "ready"}
        ready = not waiting_for
        headers = None if ready else {"Retry-After": str(self.cfg.retry_after_s)}
        return JSONResponse({"ready": ready, "waiting_for": waiting_for, "unavailable": never, "models": states},
                            status_code=200 if ready else 503, headers=headers)

    async def _running_replicas(self) -> dict[str, tuple[int, str]] | None:
        """Serve's controller view of each model: (running replicas, deployment status); None if it cannot say."""
        from ray import serve

        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5.0)
        except Exception as exc:  # readiness then rests on the replica probes alone
            log.warning("serve.status() failed: %s", exc)
            return None
        out: dict[str, tuple[int, str]] = {}
        for served, handle in self.handles.items():
            app = status.applications.get(handle.app_name)
            deployment = app.deployments.get(handle.deployment_name) if app else None
            if deployment is not None:
                out[served] = (int(deployment.replica_states.get("RUNNING", 0)), str(deployment.status.value))
        return out

    async def metrics_text(self, route: Route, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        await self.metrics.flush()
        return Response(await self.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, route: Route, request: Request) -> dict[str, Any]:
        await asyncio.gather(*(self._try_info(e) for e in self.models.values()))
        return {"models": [e.summary() for e in self.models.values()]}

    async def get_model(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        entry = self.models.get(name) or self.model(name)
        await self._try_info(entry)
        return entry.detail()

    async def _try_info(self, entry: ModelEntry) -> None:
        try:
            await asyncio.wait_for(self.runtime_info(entry), 5.0)
        except (ApiError, asyncio.TimeoutError):
            pass  # the listing still answers from the config; /readyz says what is wrong

    async def infer(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        """predict, embed and encode: the image and options of the request, the options model chosen by the
        model's task, one replica call, and the answer with the model's name (and the options it echoes).
        On a ``batch`` route an ``images`` list goes to the replica in one call (its images share batches) and the
        answer is ``{"model", "results"}``, each result exactly the answer to that image alone."""
        entry = self.model(name, route)
        parsed = await parse_image_request(request, self.limits, image_required=route.image == "required",
                                           images_allowed=route.batch)
        options = parse_options(route.options_for(entry.tasks), parsed.options, self.limits)
        echoed = {field: getattr(options, option) for field, option in route.echoed_options}
        if parsed.images is not None:
            results = await self.call(name, "many", route.replica_method, await self.image_args(name, parsed.images),
                                      options.runner_kwargs(), request_id(request))
            return self.warned({"model": name, "results": [self.warned({"model": name, **echoed, **result}, name)
                                                           for result in results]}, name)
        argument = image_id_of(parsed.image) if route.replica_argument == "image_id" else options.runner_kwargs()
        result = await self.call(name, route.replica_method, await self.image_arg(name, parsed.image), argument,
                                 request_id(request), image_id=argument if isinstance(argument, str) else "")
        return self.warned({"model": name, **echoed, **result}, name)

    async def _sam_segment(self, route: Route, name: str, image: Any, image_id: str, options: Any, rid: str
                          ) -> dict[str, Any]:
        """A SAM replica's answer to /v1's or v2's segment options: every object (``mode: everything``) or the
        prompts' masks, keyed by ``image_id`` so the call reaches the replica holding its embedding."""
        if options.mode == "everything":
            return await self.call(name, EVERYTHING_REPLICA_METHOD, image, image_id, options.everything_options(),
                                   options.format, rid, image_id=image_id)
        return await self.call(name, route.replica_method, image, image_id, options.prompt_list(), options.format,
                               rid, image_id=image_id)

    async def segment(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        """SAM prompts (or ``mode: everything``) on an image or on the image_id of one already encoded: the image
        is optional here."""
        entry = self.model(name, route)
        parsed = await parse_image_request(request, self.limits, image_required=route.image == "required")
        options = parse_options(route.options_for(entry.tasks), parsed.options, self.limits)
        if parsed.image:
            image_id = image_id_of(parsed.image)
            if options.image_id and options.image_id != image_id:
                raise bad_request(f"image_id {options.image_id} is not the sha256 of the image sent "
                                  f"({image_id}); send one or the other.")
            image: Any = await self.image_arg(name, parsed.image)
        elif options.image_id:
            image_id, image = options.image_id, None
        else:
            raise bad_request("segment needs the image (field `image`) or the image_id that encode returned.",
                              type="missing_image")
        result = await self._sam_segment(route, name, image, image_id, options, request_id(request))
        if options.mode == "everything":
            return self.warned({"model": name, "mode": "everything", "format": options.format, **result}, name)
        results = result.pop("results")
        if options.prompts is None:
            result["masks"] = results[0]["masks"]
        else:
            result["results"] = results
        return self.warned({"model": name, "format": options.format, **result}, name)

    async def detect_segment(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        """Detect, then segment: the detector's predict and this SAM's encode run at once (the embedding does not
        wait for the boxes), then the boxes go to the SAM's segment as box prompts on the cached embedding. Each
        replica is called as its own route calls it, so batching, timeouts, metrics and the cache all apply."""
        from vfm.models.pipelines import merge_json

        self.model(name, route)
        parsed = await parse_image_request(request, self.limits, image_required=route.image == "required")
        options = parse_options(route.options_for(), parsed.options, self.limits)
        detector = self.model(options.detector)
        if "detect" not in detector.tasks:
            raise bad_request(f"Model {options.detector!r} is not a detector (it does {', '.join(detector.tasks)}); "
                              "`detector` must name a served detection model.", type="unsupported_task")
        image_id, rid = image_id_of(parsed.image), request_id(request)
        sam_image = await self.image_arg(name, parsed.image)
        detector_image = await self.image_arg(options.detector, parsed.image)
        detected, encoded = await _all(
            self.call(options.detector, "predict", detector_image, options.detect_kwargs(self.limits), rid),
            self.call(name, "encode", sam_image, image_id, rid, image_id=image_id))
        found = detected["detections"]
        masks: list[list[dict[str, Any]]] = []
        if found:  # the image is sent too, so an embedding evicted meanwhile is computed again, not a 404
            prompts = [{"box": d["box"], "multimask": options.multimask} for d in found]
            segmented = await self.call(name, "segment", sam_image, image_id, prompts, options.format, rid,
                                        image_id=image_id)
            masks = [r["masks"] for r in segmented["results"]]
        return self.warned({"model": name, "detector": options.detector, "format": options.format,
                            "image_id": image_id, "cached": encoded["cached"], "image_size": encoded["image_size"],
                            "detections": merge_json(found, masks)}, options.detector, name)

    async def list_heads(self, route: Route, request: Request) -> dict[str, Any]:
        return {"heads": self.heads.list()}

    async def reload_heads(self, route: Route, request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(self.heads.reload)

    async def head_predict(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        """A fine-tuned head over the features its backbone's replica computes."""
        entry = self.heads.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.heads.names(), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise not_found("unknown_head", f"No head {name!r} is loaded from {self.heads.folder}.{hint} "
                            "GET /v1/heads lists them; POST /v1/admin/heads/reload rescans the folder.")
        if entry.status != "ready":  # a broken head file: fixing it and reloading the heads is an operator's job
            raise unavailable("head_unavailable", f"Head {name!r} did not load: {entry.reason} Fix or replace it in "
                              f"{self.heads.folder}, then POST /v1/admin/heads/reload.", None)
        backbone = self._backbone_for(entry.backbone or "")
        parsed = await parse_image_request(request, self.limits, image_required=route.image == "required",
                                           images_allowed=route.batch)
        options = parse_options(route.options_for(), parsed.options, self.limits)
        kwargs, rid = {"normalize": entry.normalize}, request_id(request)
        if parsed.images is not None:
            results = await self.call(backbone, "many", route.replica_method,
                                      await self.image_args(backbone, parsed.images), kwargs, rid)
        else:
            results = [await self.call(backbone, route.replica_method, await self.image_arg(backbone, parsed.image),
                                       kwargs, rid)]
        features = np.asarray([result["embedding"] for result in results], dtype=np.float32)
        try:
            top = await asyncio.to_thread(entry.head.classify, features, options.top_k)
        except ValueError as exc:  # features that do not fit the head: the backbone is not the trained one
            raise unavailable("head_unavailable", f"Head {name!r} cannot use {backbone!r}'s features: {exc}. Serve "
                              "the backbone it was trained on, or train the head again.", None) from None
        answers = [self.warned({"head": name, "backbone": backbone, **t.to_json()}, backbone) for t in top]
        if parsed.images is not None:
            return self.warned({"head": name, "backbone": backbone, "results": answers}, backbone)
        return answers[0]

    def _backbone_for(self, backbone: str) -> str:
        """The served name of a head's backbone (served under its own name first, else any alias)."""
        candidates = [backbone] if backbone in self.models else []
        candidates += [n for n, e in self.models.items() if e.registry == backbone and n != backbone]
        for name in candidates:
            if self.models[name].status == "ready" and self.cfg.models[name].backend == "torch":
                return name
        for name in candidates:
            if self.models[name].status == "ready":
                return name
        if candidates:  # configured, but it can never load here
            raise cannot_load(candidates[0], self.models[candidates[0]].reason, type="backbone_unavailable",
                              what=f"The head's backbone {candidates[0]!r}")
        raise unavailable("backbone_unavailable", f"The head's backbone {backbone!r} is not served here; add it "
                          "under `models:` in the config.", None)

    # ---- the Open Inference Protocol v2 (oip.py translates; the models are called as /v1 calls them) ------------
    async def oip_server(self, route: Route, request: Request) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("vfm")
        except PackageNotFoundError:
            found = "0"
        return oip.server_metadata(found)

    async def oip_live(self, route: Route, request: Request) -> dict[str, Any]:
        return {"live": True}

    async def oip_ready(self, route: Route, request: Request) -> Response:
        ready = await self.readyz(route, request)
        return JSONResponse({"ready": ready.status_code == 200}, status_code=ready.status_code,
                            headers={k: v for k, v in ready.headers.items() if k.lower() == "retry-after"} or None)

    async def oip_model_ready(self, route: Route, request: Request, name: str) -> Response:
        entry = self.models.get(name) or self.model(name)
        ready = entry.status == "ready"
        if ready:
            try:
                await asyncio.wait_for(self.runtime_info(entry), 5.0)
            except (ApiError, asyncio.TimeoutError):
                ready = False
        retry = {"Retry-After": str(self.cfg.retry_after_s)} if entry.status == "ready" and not ready else None
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503, headers=retry)

    async def oip_model(self, route: Route, request: Request, name: str) -> dict[str, Any]:
        entry = self.models.get(name) or self.model(name)
        await self._try_info(entry)
        return oip.model_metadata(name, entry.tasks, entry.runtime.get("backend", entry.serving.get("backend")))

    async def oip_infer(self, route: Route, request: Request, name: str) -> Response:
        """The request's images to the replicas' predict and/or embed (as the outputs asked for choose), with the
        options of its ``parameters`` parsed as /v1 parses them; one replica call per task, several images in one
        ``many`` call (they share batches), the tasks at once."""
        entry = self.model(name, route)
        body = await read_body(request, self.limits.max_body_bytes)
        inputs = oip.parse_infer_request(body, request.headers.get(oip.HEADER), self.limits)
        tasks = oip.plan(name, entry.tasks, inputs.outputs)
        if tasks == ["segment"]:
            return await self._oip_segment(route, request, name, entry, inputs)
        if not inputs.images:
            raise bad_request(f"No inputs; model {name!r} needs `image` (BYTES) or `pixels` (UINT8) (only a SAM "
                              "model takes an `image_id` parameter instead).")
        models = {task: route.options_for([task]) for task in tasks}
        raw = oip.split_options(inputs.options, models)
        options = {task: parse_options(models[task], raw[task], self.limits) for task in tasks}
        rid = request_id(request)
        images = [await self.image_arg(name, image, f"image[{i}]") if isinstance(image, bytes) else image
                  for i, image in enumerate(inputs.images)]

        async def run(task: str) -> list[dict[str, Any]]:
            method = "embed" if task == "embed" else "predict"
            kwargs = options[task].runner_kwargs()
            if len(images) == 1:
                return [await self.call(name, method, images[0], kwargs, rid)]
            return await self.call(name, "many", method, images, kwargs, rid)

        answers = await _all(*(run(task) for task in tasks))
        tensors = [tensor for task, results in zip(tasks, answers)
                   for tensor in oip.output_tensors(task, results, inputs.batched)]
        return oip.infer_response(name, tensors, inputs, entry.warnings)

    async def _oip_segment(self, route: Route, request: Request, name: str, entry: ModelEntry,
                           inputs: oip.Inputs) -> Response:
        """SAM over v2: the request parameters parsed as /v1 segment's options, the replica called as /v1's segment
        calls it (same cache, same metrics), its masks as tensors."""
        options = parse_options(route.options_for(["segment"]), oip.segment_options(inputs.options), self.limits)
        uint8 = any(o.name == "masks_uint8" for o in inputs.outputs or [])
        if uint8 and options.format != "rle":
            raise bad_request(f"masks_uint8 needs format rle (the default), not {options.format!r}.")
        if options.format == "png":
            raise bad_request("format png is /v1's; over v2 ask for the output `masks_uint8` (UINT8 [M,H,W]), or "
                              "format rle or polygons (the `masks` output, JSON text).")
        if len(inputs.images) > 1:
            raise bad_request(f"{len(inputs.images)} images; a SAM model segments one image per request.")
        if inputs.images:
            data = inputs.images[0]
            raw = data if isinstance(data, bytes) else b"%dx%d:" % data.shape[:2] + data.tobytes()
            image_id = image_id_of(raw)
            if options.image_id and options.image_id != image_id:
                raise bad_request(f"image_id {options.image_id} is not the sha256 of the image sent ({image_id}); "
                                  "send one or the other.")
            image: Any = await self.image_arg(name, data, "image[0]") if isinstance(data, bytes) else data
        else:
            image_id, image = options.image_id, None
        answer = await self._sam_segment(route, name, image, image_id, options, request_id(request))
        if uint8:
            height, width = answer["image_size"]["height"], answer["image_size"]["width"]
            count = sum(len(r["masks"]) for r in answer["results"]) if "results" in answer else len(answer["masks"])
            if count * height * width > self.limits.max_body_bytes:
                raise payload_too_large(f"masks_uint8: {count} masks of {height}x{width} is more than "
                                        f"{self.limits.max_body_bytes} bytes; ask for `masks` (RLE) instead.")
        return oip.infer_response(name, oip.segment_tensors(answer, uint8), inputs, entry.warnings)


def cannot_load(name: str, reason: str | None, type: str = "model_unavailable", what: str = "") -> ApiError:
    """The 503 of a model that can never load here without an operator's action: no Retry-After (retrying cannot
    help), and the reason, which says what to do (fetch the weights, where to put them)."""
    return unavailable(type, f"{what or f'Model {name!r}'} cannot load on this server: {reason} Until then it "
                       "stays unavailable (retrying does not help; restart the service once it is done, and "
                       "`vfm serve --check` tells which models can load).", None)


async def _all(*calls: Any) -> list[Any]:
    """Await every call (none is left running unobserved), then raise the first error, if any."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results

"""``ModelServer``: the Ray Serve deployment class of every served model (one deployment each).

Every model is served the same few steps: decode the image bytes, queue the image for dynamic
batching (``batcher.Batcher`` with the model's ``max_batch_size``/``batch_wait_timeout_s``: a batch is what
queued while the model was busy), run one runner call per group of requests with the same options, in a
thread of its own so the replica keeps accepting requests meanwhile, and answer JSON-ready dicts. Expected
problems (bad bytes, bad prompts, an evicted SAM embedding) come back as ``Failure`` values; so does
an input the model raises on, after the batch it was in ran again image by image (its batch-mates
still get their answers; the log line carries the request id).

Images are decoded here, in the replica, by default (``decode_in: replica``): it measured faster
and sends compressed bytes, not pixels, through Ray (docs/decisions.md has the measurements);
``decode_in: ingress`` is for replicas on CPU-starved GPU nodes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .batcher import Batcher
from .config import ServiceConfig
from .errors import Failure
from .metrics import MetricsBuffer
from .sam_cache import EmbeddingCache

log = logging.getLogger(__name__)

# A replica whose model calls failed this many times in a row (CUDA errors, a dead device)
# reports unhealthy, and Serve replaces it.
UNHEALTHY_AFTER = 3


@dataclass(frozen=True)
class Job:
    """One image waiting for a batch; jobs with equal ``task`` and ``options`` share a runner call."""

    task: str                                   # classify | detect | embed | encode
    image: np.ndarray
    options: tuple[tuple[str, Any], ...] = ()
    request_id: str = ""                        # X-Request-ID, for the log line of a failure


def _freeze(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


def _device_fault(exc: BaseException) -> bool:
    """A failure of the machine (CUDA, memory) rather than of one input."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(k in text for k in ("cuda", "cudnn", "cublas", "out of memory",
                                                                    "device-side", "acceleratorerror"))


def runner_options(cfg: ServiceConfig, served: str) -> dict[str, Any]:
    """The ``load_model`` options of a served model: its ``options``, dtype, and the ONNX repository."""
    mc = cfg.models[served]
    options = dict(mc.options)
    if mc.backend == "onnx":
        options.update(repository=cfg.model_repository, auto_export=mc.auto_export)
        if mc.quantize or mc.dtype != "float32":  # the NAME.int8 / NAME.float16 export
            options.update(quantize=mc.quantize, dtype=mc.dtype)
    elif mc.dtype != "float32":
        options["dtype"] = mc.dtype
    return options


class ModelServer:
    """Loads one model, warms it up, and answers the ingress's calls."""

    async def __init__(self, served: str, cfg: ServiceConfig, hub: Any):
        from vfm.models import ImageLimits, load_model
        from vfm.models.backends.torch import set_threads
        from vfm.models.published import use_models_dir

        use_models_dir(cfg.models_dir)  # a fine-tuned model published there is looked up by name in this process

        self.served = served
        self.cfg = cfg.models[served]
        self.limits = ImageLimits(max_bytes=cfg.limits.max_body_bytes, max_pixels=cfg.limits.max_pixels)
        self.metrics = MetricsBuffer(hub, cfg.metrics_flush_s)
        if self.cfg.num_gpus == 0:
            # Ray reserved num_cpus for this replica; more intra-op threads would only fight the others.
            set_threads(max(1, round(self.cfg.num_cpus)))
        self.runner = await asyncio.to_thread(load_model, cfg.registry_name(served), self.cfg.backend,
                                              self.cfg.device, self.cfg.weights, **runner_options(cfg, served))
        # The model's own thread: a batch never waits behind decodes in the default pool.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"vfm-model-{served}")
        self._batcher: Batcher[Job, Any] = Batcher(self._infer_batch, self.cfg.max_batch_size,
                                                   self.cfg.batch_wait_timeout_s)
        tasks = self.runner.tasks
        self.predict_task = "classify" if "classify" in tasks else "detect" if "detect" in tasks else None
        self.cache = EmbeddingCache(cfg.sam_cache_size) if "segment" in tasks else None
        self._failures = 0
        self._last_error = ""
        started = time.perf_counter()
        await asyncio.to_thread(self.runner.warmup)
        log.info("%s ready (%s on %s), warm-up %.2fs", served, self.runner.backend, self.runner.device,
                 time.perf_counter() - started)
        self.metrics.set("vfm_model_ready", (served,), 1)

    # ---- what the ingress calls --------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        return self.runner.info()

    async def predict(self, image: bytes | np.ndarray, options: dict[str, Any], request_id: str = "",
                      ) -> dict | Failure:
        if self.predict_task is None:
            return self._unsupported("predict")
        decoded = await self._decode(image)
        if isinstance(decoded, Failure):
            return decoded
        return await self._infer(Job(self.predict_task, decoded, _freeze(options), request_id))

    async def embed(self, image: bytes | np.ndarray, options: dict[str, Any], request_id: str = "",
                    ) -> dict | Failure:
        if "embed" not in self.runner.tasks:
            return self._unsupported("embed")
        decoded = await self._decode(image)
        if isinstance(decoded, Failure):
            return decoded
        return await self._infer(Job("embed", decoded, _freeze(options), request_id))

    async def many(self, method: str, images: list[bytes | np.ndarray], options: dict[str, Any],
                   request_id: str = "") -> list[dict] | Failure:
        """``predict`` or ``embed`` (``method``) on the images of one request: they are decoded, then enter the batch
        queue together, so they share runner calls (up to ``max_batch_size`` each). The first image that fails makes
        the whole answer its Failure, its message led by ``images[i]:``; no model runs when one fails to decode."""
        task = self.predict_task if method == "predict" else "embed" if "embed" in self.runner.tasks else None
        if method not in ("predict", "embed") or task is None:
            return self._unsupported(method)
        decoded = await asyncio.gather(*(self._decode(image) for image in images))
        results = decoded
        if not any(isinstance(d, Failure) for d in decoded):
            frozen = _freeze(options)
            results = await asyncio.gather(*(self._infer(Job(task, d, frozen, request_id)) for d in decoded))
        for i, result in enumerate(results):
            if isinstance(result, Failure):
                return Failure(result.status, result.type, f"images[{i}]: {result.message}")
        return list(results)

    async def encode(self, image: bytes | np.ndarray, image_id: str, request_id: str = "") -> dict | Failure:
        if self.cache is None:
            return self._unsupported("encode")
        found = await self._embedding(image, image_id, request_id)
        if isinstance(found, Failure):
            return found
        embedding, cached = found
        return {"image_id": image_id, "cached": cached, **_size_json(embedding.original_size)}

    async def segment(self, image: bytes | np.ndarray | None, image_id: str, prompts: list[dict[str, Any]],
                      mask_format: str, request_id: str = "") -> dict | Failure:
        return await self._on_embedding(image, image_id, request_id,
                                        lambda embedding: {"results": self._segment(embedding, prompts, mask_format)})

    async def segment_everything(self, image: bytes | np.ndarray | None, image_id: str, options: dict[str, Any],
                                 mask_format: str, request_id: str = "") -> dict | Failure:
        """Every object on the image (``SamRunner.segment_everything``), on the cached embedding when there is one."""
        return await self._on_embedding(image, image_id, request_id,
                                        lambda embedding: self._segment_everything(embedding, options, mask_format))

    async def _on_embedding(self, image: bytes | np.ndarray | None, image_id: str, request_id: str,
                            work: Callable[[Any], dict[str, Any]]) -> dict | Failure:
        """``work(embedding)`` in a thread on the cached embedding of ``image_id`` (encoding ``image`` on a miss);
        its ValueError (options the model refuses) is a 422."""
        if self.cache is None:
            return self._unsupported("segment")
        found = await self._embedding(image, image_id, request_id)
        if isinstance(found, Failure):
            return found
        embedding, cached = found
        try:
            result = await asyncio.to_thread(work, embedding)
        except ValueError as exc:
            return Failure(422, "invalid_options", str(exc))
        return {"image_id": image_id, "cached": cached, **_size_json(embedding.original_size), **result}

    def check_health(self) -> None:
        if self._failures >= UNHEALTHY_AFTER:
            raise RuntimeError(f"{self.served}: the last {self._failures} model calls failed ({self._last_error})")

    # ---- batching ----------------------------------------------------------------------------
    async def _infer(self, job: Job) -> Any:
        """``job``'s answer, from the batch it joins (``Batcher``: one consumer per replica)."""
        return await self._batcher(job)

    async def _infer_batch(self, jobs: list[Job]) -> list[Any]:
        out: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.task, job.options)].append(i)
        for (task, options), indices in groups.items():
            results = await self._run(task, [jobs[i] for i in indices], dict(options))
            for i, result in zip(indices, results):
                out[i] = result
        return out

    async def _run(self, task: str, jobs: list[Job], options: dict[str, Any]) -> list[Any]:
        """One runner call for ``jobs``; when it raises, each job runs alone, so an input that makes the
        model raise fails its own request and its batch-mates still get their answers."""
        started = time.perf_counter()
        labels = (self.served, task)
        self.metrics.observe("vfm_batch_size", labels, len(jobs))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._call_runner, task, [job.image for job in jobs], options)
        except Exception as exc:
            if len(jobs) > 1:
                return [(await self._run(task, [job], options))[0] for job in jobs]
            return [self._failed(task, jobs[0], exc)]
        self._failures = 0
        self.metrics.observe("vfm_inference_latency_seconds", labels, time.perf_counter() - started)
        return results

    def _failed(self, task: str, job: Job, exc: Exception) -> Failure:
        """The answer to one input the runner raised on (logged with the request id)."""
        if isinstance(exc, ValueError):  # a runner's way to refuse one input
            return Failure(422, "invalid_options", str(exc))
        request = job.request_id or "-"
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if _device_fault(exc):  # the machine, not the input: counts towards check_health
            self._failures += 1
            self._last_error = reason
            log.error("request %s: %s %s failed on the device: %s", request, self.served, task, reason)
            return Failure(503, "model_unavailable", f"Model {self.served!r} failed on its device ({reason}); "
                           f"retry later. Request id {request}.")
        log.error("request %s: %s %s raised on this input", request, self.served, task, exc_info=exc)
        return Failure(422, "unprocessable_image", f"Model {self.served!r} could not process this image "
                       f"({reason}); try another size or aspect ratio. Request id {request}.")

    def _call_runner(self, task: str, images: list[np.ndarray], options: dict[str, Any]) -> list[Any]:
        runner = self.runner
        if task == "classify":
            return [c.to_json() for c in runner.classify(images, **options)]
        if task == "detect":
            return [d.to_json() for d in runner.detect(images, **options)]
        if task == "embed":
            features = np.asarray(runner.embed(images, **options), dtype=np.float32)
            return [{"embedding": row.tolist(), "dim": int(row.shape[0])} for row in features]
        if task == "encode":
            return runner.encode(images)
        raise ValueError(f"unknown task {task!r}")

    # ---- helpers -----------------------------------------------------------------------------
    async def _decode(self, image: bytes | np.ndarray) -> np.ndarray | Failure:
        from vfm.models import InvalidImage, decode_image

        if isinstance(image, np.ndarray):  # decoded by the ingress (decode_in: ingress)
            return image
        try:
            return await asyncio.to_thread(decode_image, image, self.limits)
        except InvalidImage as exc:
            return Failure(exc.status, exc.code, str(exc))

    async def _embedding(self, image: bytes | np.ndarray | None, image_id: str, request_id: str = "",
                         ) -> tuple[Any, bool] | Failure:
        """The cached embedding of ``image_id``, else encode ``image``; ``(embedding, was_cached)``."""
        assert self.cache is not None
        labels = (self.served,)
        embedding = self.cache.get(image_id)
        if embedding is None and (pending := self.cache.pending(image_id)) is not None:
            embedding = await asyncio.shield(pending)
            if isinstance(embedding, Failure):
                return embedding
        if embedding is not None:
            self.metrics.inc("vfm_sam_cache_hits", labels)
            return embedding, True
        self.metrics.inc("vfm_sam_cache_misses", labels)
        if image is None:
            return Failure(404, "unknown_image_id",
                           f"No embedding for image_id {image_id} on {self.served} (never encoded here, evicted "
                           f"from the cache of {self.cache.capacity}, or its replica restarted); send the image "
                           "again in the `image` field.")
        self.cache.claim(image_id)
        try:
            decoded = await self._decode(image)
            result = (decoded if isinstance(decoded, Failure)
                      else await self._encode_batched(Job("encode", decoded, request_id=request_id)))
        except BaseException:
            self.cache.fail(image_id, Failure(503, "overloaded", "The encoder run for this image was interrupted; "
                                                                 "send the request again."))
            raise
        if isinstance(result, Failure):
            self.cache.fail(image_id, result)
            return result
        self.cache.resolve(image_id, result)
        return result, False

    async def _encode_batched(self, job: Job) -> Any:
        """``job`` into the batch queue together with the encodes of other image ids. SAM requests arrive keyed by
        image id (``multiplexed_model_id``, for ``sam_routing``); the batcher ignores that key (Serve's own batching
        would split a batch by it), so encodes of different images share encoder runs."""
        return await self._infer(job)

    def _segment(self, embedding: Any, prompts: list[dict[str, Any]], mask_format: str) -> list[dict[str, Any]]:
        from vfm.models import Prompt

        objects = [Prompt(points=None if p.get("points") is None else np.asarray(p["points"], np.float64),
                          point_labels=None if p.get("point_labels") is None else np.asarray(p["point_labels"]),
                          box=None if p.get("box") is None else np.asarray(p["box"], np.float64),
                          multimask=bool(p.get("multimask", False)))
                   for p in prompts]
        started = time.perf_counter()
        masks = self.runner.segment(embedding, objects)
        self.metrics.observe("vfm_inference_latency_seconds", (self.served, "segment"), time.perf_counter() - started)
        return [m.to_json(mask_format) for m in masks]

    def _segment_everything(self, embedding: Any, options: dict[str, Any], mask_format: str) -> dict[str, Any]:
        started = time.perf_counter()
        found = self.runner.segment_everything(embedding, **options)
        self.metrics.observe("vfm_inference_latency_seconds", (self.served, "segment_everything"),
                             time.perf_counter() - started)
        return found.to_json(mask_format)

    def _unsupported(self, route: str) -> Failure:
        return Failure(400, "unsupported_task", f"Model {self.served!r} has no {route} route; it supports: "
                       f"{', '.join(self.runner.tasks)}.")


def _size_json(size: tuple[int, int]) -> dict[str, Any]:
    return {"image_size": {"height": int(size[0]), "width": int(size[1])}}

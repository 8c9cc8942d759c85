"""Feature extraction at scale: Ray Data ``map_batches`` over a pool of actors, each holding the
backbone once (on its own GPU when the cluster has them).

Workers import ``models`` and ``finetune``, so the cluster must run an image with vfm installed
(the same one the service runs), and image files must be at the same paths on the workers (a
shared volume); idx data travels with the job. The driver keeps the cache: only chunks it
lacks are sent.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .config import RayOptions
from .data import ImageSource
from .extractors import BackboneExtractor, Extractor

log = logging.getLogger(__name__)


class EmbedActor:
    """One backbone per actor; a batch of indices in, their features out."""

    def __init__(self, source: ImageSource, extractor: Extractor, device: str):
        from .features import embed_indices

        self.embed_indices = embed_indices
        self.source = source
        self.extractor = extractor
        if isinstance(extractor, BackboneExtractor):
            extractor.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = np.asarray(batch["index"], np.int64)
        feats, valid, reasons = self.embed_indices(self.source, idx, self.extractor, batch_size=len(idx))
        why = np.array([""] * len(idx), dtype=object)
        for row, reason in reasons:
            why[row] = reason
        return {"index": idx, "features": feats, "valid": valid, "reason": why}


def connect(address: str) -> None:
    import ray

    if ray.is_initialized():
        return  # a caller (or a test) already set Ray up
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def pool_shape(options: RayOptions) -> tuple[int, float]:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if per_actor > gpus:
        raise ValueError(f"--ray-gpus {per_actor:g} per actor, but the Ray cluster has {gpus:g} GPU(s).")
    actors = options.actors or (max(1, int(gpus // per_actor)) if per_actor > 0 else 2)
    return actors, per_actor


def extract_with_ray(source: ImageSource, indices: np.ndarray, extractor: Extractor, batch_size: int,
                     options: RayOptions, on_rows: Callable[[int], Any] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """Features of ``source[indices]`` (in that order), valid flags, and (reason, position) of each
    unreadable image."""
    import ray.data

    connect(options.address)
    actors, gpus = pool_shape(options)
    log.info("Ray Data extraction: %d actor(s), %g GPU each, batches of %d", actors, gpus, batch_size)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts the images; Ray's would interleave with it
    blocks = max(1, min(len(indices) // batch_size, 4 * actors))
    ds = ray.data.from_items([{"index": int(i)} for i in indices], override_num_blocks=blocks)
    out = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                         num_cpus=options.cpus_per_actor,
                         fn_constructor_kwargs={"source": source, "extractor": extractor,
                                                "device": "cuda" if gpus > 0 else "cpu"})
    position = {int(i): p for p, i in enumerate(indices)}
    feats = np.zeros((len(indices), extractor.feature_dim), np.float32)
    valid = np.zeros(len(indices), bool)
    reasons: list[tuple[str, int]] = []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows = np.array([position[int(i)] for i in batch["index"]], dtype=np.int64)
        feats[rows] = np.stack(list(batch["features"])) if batch["features"].dtype == object else batch["features"]
        valid[rows] = batch["valid"]
        reasons += [(str(r), int(p)) for r, p, ok in zip(batch["reason"], rows, batch["valid"]) if not ok]
        if on_rows:
            on_rows(len(rows))
    return feats, valid, sorted(reasons, key=lambda rp: rp[1])

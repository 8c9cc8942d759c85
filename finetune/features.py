"""Frozen-backbone features, extracted in batches and cached on disk.

The cache is keyed by everything that changes a feature vector: backbone name, a digest of its
weights, its preprocessing, the ``normalize`` flag of ``embed``, and the pixels of each image
(``ImageSource.item_key``). Features are stored in chunks of ``CHUNK`` images, so an interrupted
extraction keeps what it finished and a damaged chunk is recomputed alone. Each chunk carries a
sha256 of its tensors; a chunk that fails to load or to match is logged and recomputed.

The missing chunks are computed as one stream of batches: DataLoader workers read, decode and
resize the next batches (``loader``) while this process runs the backbone on the current one,
and each chunk is written to the cache as soon as its last batch is done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vfm.models.images import InvalidImage

from .data import ImageSource
from .extractors import Extractor

log = logging.getLogger(__name__)

CHUNK = 1024
CACHE_FORMAT = 1


@dataclass
class ExtractionStats:
    total: int = 0
    cached: int = 0          # images whose features came from the cache
    computed: int = 0        # images run through the backbone (or read and found unreadable)
    skipped: int = 0         # unreadable images (from either)
    corrupt_chunks: int = 0  # cache entries found damaged and recomputed
    seconds: float = 0.0     # wall time of the whole extraction
    compute_seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "cached": self.cached, "computed": self.computed, "skipped": self.skipped,
                "corrupt_chunks": self.corrupt_chunks, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 1) if self.seconds > 0 else None,
                "skipped_examples": self.skipped_examples[:20]}


@dataclass
class FeatureSet:
    features: np.ndarray  # float32 [N, D]; rows of unreadable images are zero
    valid: np.ndarray     # bool [N]
    stats: ExtractionStats


class FeatureCache:
    """``root/<backbone key digest>/<chunk digest>.safetensors`` + a ``key.json`` saying what the key is."""

    def __init__(self, root: Path, extractor: Extractor):
        self.model_key = json.dumps(extractor.key(), sort_keys=True)
        digest = hashlib.sha256(self.model_key.encode()).hexdigest()
        self.folder = Path(root) / f"{extractor.name.replace('/', '_')}-{digest[:16]}"

    def chunk_key(self, item_keys: list[str]) -> str:
        h = hashlib.sha256(self.model_key.encode())
        for k in item_keys:
            h.update(b"\n" + k.encode())
        return h.hexdigest()

    def path(self, chunk_key: str) -> Path:
        return self.folder / f"{chunk_key[:32]}.safetensors"

    def load(self, chunk_key: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """The chunk's (features, valid, reasons), ``None`` if absent; ``CorruptEntry`` if damaged."""
        path = self.path(chunk_key)
        if not path.exists():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                feats, valid = f.get_tensor("features"), f.get_tensor("valid")
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise CorruptEntry(f"{path}: unreadable ({exc})") from None
        if meta.get("chunk_key") != chunk_key or feats.shape != (n, dim) or valid.shape != (n,):
            raise CorruptEntry(f"{path}: wrong key or shape {feats.shape}")
        if meta.get("sha256") != _digest(feats, valid):
            raise CorruptEntry(f"{path}: checksum mismatch")
        return feats, valid.astype(bool), json.loads(meta.get("reasons", "[]"))

    def save(self, chunk_key: str, feats: np.ndarray, valid: np.ndarray, reasons: list[str]) -> None:
        from safetensors.numpy import save

        from vfm.models.checkpoints import atomic_write_bytes

        valid_u8 = valid.astype(np.uint8)
        meta = {"chunk_key": chunk_key, "sha256": _digest(feats, valid_u8), "reasons": json.dumps(reasons),
                "format": str(CACHE_FORMAT)}
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            atomic_write_bytes(key_file, self.model_key.encode())
        atomic_write_bytes(self.path(chunk_key), save({"features": feats, "valid": valid_u8}, metadata=meta))


class CorruptEntry(Exception):
    """A cache chunk that exists but cannot be trusted."""


def _digest(feats: np.ndarray, valid: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(feats, np.float32).tobytes())
    h.update(np.ascontiguousarray(valid, np.uint8).tobytes())
    return h.hexdigest()


def load_one(source: ImageSource, index: int) -> tuple[np.ndarray | None, str]:
    """The image, or ``None`` and why it could not be read (never raises for a bad image)."""
    try:
        return source.load(index), ""
    except (InvalidImage, OSError, ValueError, TypeError) as exc:
        return None, f"{source.describe(index)}: {' '.join(str(exc).split()) or type(exc).__name__}"


def embed_indices(source: ImageSource, indices: np.ndarray, extractor: Extractor, batch_size: int,
                  pool: ThreadPoolExecutor | None = None, on_batch: Any = None
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Features of ``source[indices]``: an unreadable image gets a zero row, ``valid=False`` and a
    (row, reason) entry."""
    feats = np.zeros((len(indices), extractor.feature_dim), np.float32)
    valid = np.zeros(len(indices), bool)
    reasons: list[tuple[int, str]] = []
    for start, loaded in _prefetched(source, indices, batch_size, pool):
        ok = [(j, img) for j, (img, why) in enumerate(loaded) if img is not None]
        reasons += [(start + j, why) for j, (img, why) in enumerate(loaded) if img is None]
        if ok:
            try:
                out = _embed_checked(extractor, [img for _, img in ok])
            except (InvalidImage, ValueError, TypeError):
                # One image the backbone refuses must not cost the batch: find it, skip it.
                for j, img in ok:
                    try:
                        feats[start + j] = _embed_checked(extractor, [img])[0]
                        valid[start + j] = True
                    except (InvalidImage, ValueError, TypeError) as exc:
                        reasons.append((start + j, f"{source.describe(int(indices[start + j]))}: {exc}"))
            else:
                rows = np.array([start + j for j, _ in ok])
                feats[rows] = out
                valid[rows] = True
        if on_batch:
            on_batch(len(loaded))
    return feats, valid, reasons


def _embed_checked(extractor: Extractor, images: list[np.ndarray]) -> np.ndarray:
    out = extractor.embed(images)
    if out.shape != (len(images), extractor.feature_dim):
        raise RuntimeError(f"{extractor.name} returned features of shape {out.shape}, "
                           f"expected ({len(images)}, {extractor.feature_dim})")
    return out


def _prefetched(source: ImageSource, indices: np.ndarray, batch_size: int, pool: ThreadPoolExecutor | None
                ) -> Iterator[tuple[int, list[tuple[np.ndarray | None, str]]]]:
    # Decoding the next batch on a thread overlaps with the forward pass of this one.
    starts = list(range(0, len(indices), batch_size))

    def read(start: int) -> list[tuple[np.ndarray | None, str]]:
        return [load_one(source, int(i)) for i in indices[start:start + batch_size]]

    if pool is None:
        for s in starts:
            yield s, read(s)
        return
    pending: Future | None = pool.submit(read, starts[0]) if starts else None
    for k, s in enumerate(starts):
        assert pending is not None
        loaded = pending.result()
        pending = pool.submit(read, starts[k + 1]) if k + 1 < len(starts) else None
        yield s, loaded


def extract_features(source: ImageSource, extractor: Extractor, cache_dir: Path | None = None,
                     batch_size: int = 64, progress: bool = True, ray: Any = None,
                     chunk_size: int = CHUNK, workers: int | None = None) -> FeatureSet:
    """Features of every image of ``source``, from the cache where it has them.

    ``workers``: DataLoader processes that read and resize images (None: ``loader.default_workers()``;
    0: in this process). ``ray`` (a ``features_ray.RayOptions``) runs the missing chunks as Ray
    Data ``map_batches`` over an actor pool instead of in this process.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n, dim = len(source), extractor.feature_dim
    stats = ExtractionStats(total=n)
    feats = np.zeros((n, dim), np.float32)
    valid = np.zeros(n, bool)
    reasons: list[str] = []
    cache = FeatureCache(cache_dir, extractor) if cache_dir is not None else None
    chunks = [np.arange(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    missing: list[tuple[np.ndarray, str | None]] = []
    for idx in chunks:
        key = cache.chunk_key([source.item_key(int(i)) for i in idx]) if cache else None
        hit = None
        if cache and key:
            try:
                hit = cache.load(key, len(idx), dim)
            except CorruptEntry as exc:
                log.warning("feature cache entry damaged, recomputing it: %s", exc)
                stats.corrupt_chunks += 1
        if hit is None:
            missing.append((idx, key))
            continue
        feats[idx], valid[idx] = hit[0], hit[1]
        reasons += hit[2]
        stats.cached += len(idx)
    if missing:
        bar = tqdm(total=n, initial=stats.cached, unit="img", desc=f"features {extractor.name}", disable=not progress)
        t1 = time.perf_counter()
        if ray is not None:
            from .features_ray import extract_with_ray

            todo = np.concatenate([idx for idx, _ in missing])
            f, v, why = extract_with_ray(source, todo, extractor, batch_size, ray, on_rows=bar.update)
            offset = 0
            for idx, key in missing:
                part = slice(offset, offset + len(idx))
                chunk_reasons = [r for r, pos in why if offset <= pos < offset + len(idx)]
                _store(feats, valid, idx, f[part], v[part], cache, key, chunk_reasons)
                reasons += chunk_reasons
                offset += len(idx)
        else:
            reasons += _extract_streamed(source, extractor, missing, batch_size, workers, feats, valid, cache,
                                         bar.update)
        stats.compute_seconds = time.perf_counter() - t1
        stats.computed = sum(len(idx) for idx, _ in missing)
        bar.close()
    stats.skipped = int((~valid).sum())
    stats.skipped_examples = reasons[:20]
    stats.seconds = time.perf_counter() - t0
    if stats.skipped:
        log.warning("%d unreadable image(s) skipped, e.g. %s", stats.skipped, reasons[0] if reasons else "")
    return FeatureSet(feats, valid, stats)


def _extract_streamed(source: ImageSource, extractor: Extractor, missing: list[tuple[np.ndarray, str | None]],
                      batch_size: int, workers: int | None, feats: np.ndarray, valid: np.ndarray,
                      cache: FeatureCache | None, on_batch: Any) -> list[str]:
    """Fill ``feats``/``valid`` for the ``missing`` chunks (contiguous ranges), batch by batch, and
    store each chunk as it completes; returns the unreadable images' reasons."""
    from .loader import default_workers, prepared_batches

    slices, ends = [], {}
    for c, (idx, _) in enumerate(missing):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        slices += [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
        ends[hi] = c
    why: dict[int, str] = {}
    done_reasons: list[str] = []
    for batch in prepared_batches(source, slices, extractor, default_workers() if workers is None else workers):
        why.update(batch.reasons)
        if len(batch.rows):
            try:
                out = _checked(extractor, extractor.embed_prepared(batch.prepared), len(batch.rows))
            except (InvalidImage, ValueError, TypeError) as exc:
                for pos in batch.rows:
                    why[int(pos)] = f"{source.describe(int(pos))}: {exc}"
            else:
                feats[batch.rows], valid[batch.rows] = out, True
        on_batch(batch.stop - batch.start)
        if batch.stop in ends:
            idx, key = missing[ends[batch.stop]]
            texts = [why.pop(int(i)) for i in idx if int(i) in why]
            _store(feats, valid, idx, feats[idx], valid[idx], cache, key, texts)
            done_reasons += texts
    return done_reasons


def _checked(extractor: Extractor, out: np.ndarray, n: int) -> np.ndarray:
    if out.shape != (n, extractor.feature_dim):
        raise RuntimeError(f"{extractor.name} returned features of shape {out.shape}, "
                           f"expected ({n}, {extractor.feature_dim})")
    return out


def _store(feats: np.ndarray, valid: np.ndarray, idx: np.ndarray, f: np.ndarray, v: np.ndarray,
           cache: FeatureCache | None, key: str | None, reasons: list[str]) -> None:
    feats[idx], valid[idx] = f, v
    if cache is not None and key is not None:
        cache.save(key, np.ascontiguousarray(f, np.float32), v, reasons)

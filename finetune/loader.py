"""Images read, decoded and resized in torch DataLoader workers, batch by batch, while the
backbone runs the batch before: the input side of feature extraction.

A worker loads one batch of images (an unreadable one becomes a reason, never an error) and
hands them to ``extractor.prepare``, which does the per-image work that needs no network: for a
classification backbone the resize and crop to its input size, for the pixel baseline the whole
feature. The resize is ``vfm.models.images.resize_image`` (Pillow), as at serve time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from vfm.models.images import InvalidImage, resize_image

from .data import ImageSource


@dataclass
class PreparedBatch:
    """One batch as a worker hands it over."""

    start: int                   # position of the batch's first image in the source
    stop: int
    rows: np.ndarray             # positions (in the source) of the images that could be prepared
    prepared: Any                # extractor.prepare() of those images, in ``rows`` order
    reasons: list[tuple[int, str]]  # (position, why) for each image that could not


def default_workers() -> int:
    """One worker per four cores, at least one and at most four: decoding a batch takes a fraction
    of the backbone's time on it, and every worker's core is a core the backbone does not get."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def resize_batch(images: Sequence[np.ndarray], spec: Any) -> np.ndarray:
    """``resize_image`` of every image (Pillow, as the service does), as one uint8 [N, H, W, 3] batch.

    Not torchvision's batched uint8 resize: on 8x8 or 28x28 images upscaled it is 2-6x faster,
    but differs from Pillow by one grey level on up to 4% of the pixels, and a head must see the
    pixels it will be served; Pillow's 0.5 ms an image is about 2% of the backbone's time on it,
    spent in a worker.
    """
    if not len(images):
        h, w = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size
        return np.zeros((0, h, w, 3), np.uint8)
    return np.stack([resize_image(im, spec) for im in images])


class _Batches:
    """A map-style dataset whose items are whole batches (the DataLoader's batch_size is None)."""

    def __init__(self, source: ImageSource, slices: list[tuple[int, int]], extractor: Any):
        self.source, self.slices, self.extractor = source, slices, extractor

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, k: int) -> PreparedBatch:
        from .features import load_one

        start, stop = self.slices[k]
        loaded = [(pos, *load_one(self.source, pos)) for pos in range(start, stop)]
        reasons = [(pos, why) for pos, img, why in loaded if img is None]
        good = [(pos, img) for pos, img, _ in loaded if img is not None]
        try:
            prepared = self.extractor.prepare([img for _, img in good])
            rows = [pos for pos, _ in good]
        except (InvalidImage, ValueError, TypeError):
            # One image the preparation refuses must not cost the batch: find it, skip it.
            parts, rows = [], []
            for pos, img in good:
                try:
                    parts.append(self.extractor.prepare([img]))
                    rows.append(pos)
                except (InvalidImage, ValueError, TypeError) as exc:
                    reasons.append((pos, f"{self.source.describe(pos)}: {' '.join(str(exc).split())}"))
            prepared = self.extractor.join_prepared(parts)
        return PreparedBatch(start, stop, np.asarray(rows, np.int64), prepared, reasons)


def _as_is(item: PreparedBatch) -> PreparedBatch:
    return item


def prepared_batches(source: ImageSource, slices: list[tuple[int, int]], extractor: Any,
                     workers: int) -> Iterator[PreparedBatch]:
    """The batches ``slices`` (start, stop) of ``source``, prepared in ``workers`` processes (0: here),
    in order."""
    dataset = _Batches(source, slices, extractor)
    if workers == 0 or len(slices) <= 1:
        for k in range(len(dataset)):
            yield dataset[k]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(slices)),
                        collate_fn=_as_is, prefetch_factor=2)
    yield from loader

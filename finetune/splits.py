"""Seeded, stratified train/val/test splits and subsets.

The data's own split (idx train/t10k files, train/ test/ folders, a manifest's split column)
is kept; what it lacks is carved, stratified, out of its training part. ``limit`` keeps at most
that many examples in all, taken from every split in proportion, stratified by class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import SPLITS, DataError, LabeledImages


@dataclass
class Splits:
    """Indices into a ``LabeledImages`` (sorted, disjoint)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def items(self) -> list[tuple[str, np.ndarray]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def union(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train, self.val, self.test]))

    def counts(self) -> dict[str, int]:
        return {name: int(len(idx)) for name, idx in self.items()}


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split an integer ``total`` in proportion to ``weights`` (largest remainder; ties to the first)."""
    weights = np.asarray(weights, dtype=np.float64)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), np.int64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    order = np.argsort(-remainder, kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def stratified_partition(labels: np.ndarray, indices: np.ndarray, fractions: np.ndarray,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Partition ``indices`` into ``len(fractions)`` parts, each class in the same proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        members = members[rng.permutation(len(members))]
        start = 0
        for i, n in enumerate(allocate(len(members), fractions)):
            parts[i].append(members[start:start + n])
            start += n
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def stratified_take(labels: np.ndarray, indices: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``indices``, each class in proportion to its share."""
    if n >= len(indices):
        return np.sort(indices)
    classes, counts = np.unique(labels[indices], return_counts=True)
    out = []
    for c, take in zip(classes, allocate(n, counts)):
        members = indices[labels[indices] == c]
        out.append(members[rng.permutation(len(members))[:take]])
    return np.sort(np.concatenate(out))


def make_splits(data: LabeledImages, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                limit: int | None = None) -> Splits:
    """Train/val/test indices: the data's own splits, the rest carved from train by ``fractions``."""
    rng = np.random.default_rng(seed)
    n = len(data)
    given = data.given_split if data.given_split is not None else np.full(n, -1, np.int8)
    pools = {s: np.flatnonzero(given == s) for s in (-1, 0, 1, 2)}
    if limit is not None and limit < n:
        sizes = allocate(limit, np.array([len(pools[s]) for s in (-1, 0, 1, 2)]))
        pools = {s: stratified_take(data.labels, pools[s], int(k), rng) for s, k in zip((-1, 0, 1, 2), sizes)}
    fr = np.asarray(fractions, dtype=np.float64)
    result = {0: pools[0], 1: pools[1], 2: pools[2]}
    if len(pools[-1]):
        # No split given: all three come from the fractions.
        for s, part in enumerate(stratified_partition(data.labels, pools[-1], fr, rng)):
            result[s] = part
    else:
        missing = [s for s in (1, 2) if not len(pools[s])]
        if missing and len(pools[0]):
            shares = np.array([fr[0]] + [fr[s] for s in missing])
            carved = stratified_partition(data.labels, pools[0], shares, rng)
            result[0] = carved[0]
            for s, part in zip(missing, carved[1:]):
                result[s] = part
    splits = Splits(result[0], result[1], result[2])
    for name, idx in splits.items():
        if not len(idx):
            raise DataError(f"{data.spec}: the {name} split is empty ({_describe(data, fractions, limit)}); "
                            "give more data, a larger --limit or a larger share in --split.")
    return splits


def check_training_classes(data: LabeledImages, train: np.ndarray) -> None:
    """Every class needs a training example (after unreadable images were dropped)."""
    present = np.bincount(data.labels[train], minlength=len(data.classes))
    empty = [data.classes[c] for c in np.flatnonzero(present == 0)]
    if empty:
        raise DataError(f"{data.spec}: class {empty[0]!r} has no readable training example"
                        f"{' (nor do ' + ', '.join(map(repr, empty[1:4])) + ')' if len(empty) > 1 else ''}; "
                        "add images, raise --limit, or leave the class out with --classes.")


def _describe(data: LabeledImages, fractions: tuple[float, float, float], limit: int | None) -> str:
    given = ", ".join(sorted(data.given_splits(), key=SPLITS.index)) or "none"
    return f"{len(data)} examples, given splits: {given}, --split {','.join(f'{f:g}' for f in fractions)}" + (
        f", --limit {limit}" if limit else "")

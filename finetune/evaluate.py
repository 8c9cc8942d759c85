"""Accuracy, per-class precision and recall, the confusion matrix, and the test-error bound.

On K test examples drawn independently of training, the test error ``e`` is an average of K
independent 0/1 losses, so by Hoeffding's inequality the true error is at most
``e + sqrt(ln(1/delta) / (2K))`` with probability at least ``1 - delta``. The bound holds for
one head fixed before the test set is looked at: ours is chosen on validation, never on test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def hoeffding_bound(error: float, k: int, delta: float = 0.05) -> float:
    """``error + sqrt(ln(1/delta) / (2k))``: the true error is below it with probability >= 1 - delta."""
    if k <= 0:
        raise ValueError("the bound needs at least one test example")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return error + math.sqrt(math.log(1.0 / delta) / (2.0 * k))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


@dataclass
class Evaluation:
    labels: tuple[str, ...]
    confusion: np.ndarray      # [C, C], rows true, columns predicted
    delta: float

    @property
    def k(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.k) if self.k else 0.0

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy

    @property
    def bound(self) -> float:
        return hoeffding_bound(self.error, self.k, self.delta)

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        """Of the examples predicted as c, the share that are c (0 when c is never predicted)."""
        predicted = self.confusion.sum(axis=0)
        return np.divide(np.diag(self.confusion), predicted, out=np.zeros(len(self.labels)), where=predicted > 0)

    @property
    def recall(self) -> np.ndarray:
        """Of the examples of class c, the share predicted as c (0 when c has no examples)."""
        support = self.support
        return np.divide(np.diag(self.confusion), support, out=np.zeros(len(self.labels)), where=support > 0)

    def bound_sentence(self) -> str:
        return (f"true error <= {min(self.bound, 1.0):.4f} with probability >= {100 * (1 - self.delta):g}% "
                f"(test error {self.error:.4f} on K={self.k} examples, Hoeffding)")

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy, "error": self.error, "k": self.k, "delta": self.delta,
            "bound": self.bound, "bound_sentence": self.bound_sentence(),
            "per_class": {label: {"precision": float(p), "recall": float(r), "support": int(s)}
                          for label, p, r, s in zip(self.labels, self.precision, self.recall, self.support)},
            "confusion": self.confusion.tolist(),
        }


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str], delta: float = 0.05) -> Evaluation:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    return Evaluation(tuple(labels), confusion_matrix(y_true, y_pred, len(labels)), float(delta))

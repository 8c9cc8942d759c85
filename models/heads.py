"""Heads that classify backbone features, and their artifact: a folder with two files.

    head.safetensors   tensors only (never a pickle)
    head.json          what the tensors mean: backbone, how its features were made, labels,
                       head type and hyper-parameters, metrics, data fingerprint

The service loads a folder with ``load_head(folder)``, checks ``meta["backbone"]`` is served,
then runs ``runner.embed(images, normalize=meta["embed"]["normalize"])`` and
``head.classify(features, top_k)``. Heads take the features exactly as ``embed`` returns them:
linear and MLP heads carry the training set's feature mean/std (``feature_mean``, ``feature_std``
in head.safetensors) and standardise inside, so whoever loads the head applies them; head.json
says so with ``head.standardize: true`` (a head.json without the key is from before it was
written, when every linear and MLP head standardised: it loads as ``true``).

    >>> head, meta = load_head("heads/fashion")
    >>> head.classify(runner.embed(images), top_k=3)[0].top[0].label
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .results import Classification, Label
from .checkpoints import atomic_write_bytes, save_state_dict
from .head_kinds import HEAD_TYPES, LOSSES, METRICS

FORMAT = "vfm-head"
VERSION = 1
JSON_NAME = "head.json"
TENSORS_NAME = "head.safetensors"
_CHUNK = 4096  # rows per matmul, so a large query or training set never needs an [N, M] matrix at once


class InvalidHead(ValueError):
    """A head folder that cannot be loaded; the message names the file and the bad key."""


class Head(ABC):
    """The classifier API shared by every head type: numpy features in, scores out."""

    head_type: str = ""
    labels: tuple[str, ...] = ()
    feature_dim: int = 0

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C] scores whose softmax is ``predict_proba`` (kNN ranks by votes instead)."""
        raise TypeError(f"{type(self).__name__} has no scores")

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The ``head`` section of head.json: type and the hyper-parameters that shape the tensors."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """What head.safetensors holds."""

    def _as_tensor(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"{self.head_type} head expects features of shape [N, {self.feature_dim}], "
                             f"got {tuple(x.shape)}; give it the output of its backbone's embed().")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features contain NaN or infinity")
        return x

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = self._as_tensor(features)
        with torch.no_grad():
            out = [torch.softmax(self.scores(x[i:i + _CHUNK]), dim=1) for i in range(0, len(x), _CHUNK)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)), np.float32)

    def ranking(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, C], order [N, C]): classes best first."""
        proba = self.predict_proba(features)
        return proba, np.argsort(-proba, axis=1, kind="stable")

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.ranking(features)[1][:, 0].astype(np.int64)

    def classify(self, features: np.ndarray, top_k: int = 5) -> list[Classification]:
        proba, order = self.ranking(features)
        k = max(1, min(int(top_k), len(self.labels)))
        return [Classification([Label(int(c), self.labels[c], float(p[c])) for c in row[:k]])
                for p, row in zip(proba, order)]


def num_outputs(loss: str, num_classes: int) -> int:
    """Hinge is binary with one margin output (labels -1/+1); ce and squared have one output per class."""
    return 1 if loss == "hinge" else num_classes


def _margin_scores(out: torch.Tensor) -> torch.Tensor:
    # A hinge head has one margin f; softmax([-f, f]) = sigmoid(2f) ranks like the margin.
    return torch.cat([-out, out], dim=1) if out.shape[1] == 1 else out


class _StandardisedHead(nn.Module, Head):
    """Linear and MLP heads: standardise with the training mean/std, then a small network."""

    def __init__(self, labels: Sequence[str], feature_dim: int, loss: str, standardize: bool = True):
        nn.Module.__init__(self)
        self.labels = tuple(labels)
        self.feature_dim = int(feature_dim)
        self.loss = loss
        self.standardize = bool(standardize)
        if self.standardize:
            self.register_buffer("feature_mean", torch.zeros(feature_dim))
            self.register_buffer("feature_std", torch.ones(feature_dim))
        self.net: nn.Sequential

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            features = (features - self.feature_mean) / self.feature_std
        return self.net(features)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return _margin_scores(self.forward(features))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


class LinearHead(_StandardisedHead):
    head_type = "linear"

    def __init__(self, labels: Sequence[str], feature_dim: int, loss: str = "ce", standardize: bool = True):
        super().__init__(labels, feature_dim, loss, standardize)
        self.net = nn.Sequential(nn.Linear(feature_dim, num_outputs(loss, len(self.labels))))
        self.eval()

    def config(self) -> dict[str, Any]:
        return {"type": "linear", "loss": self.loss, "standardize": self.standardize}


class MLPHead(_StandardisedHead):
    head_type = "mlp"

    def __init__(self, labels: Sequence[str], feature_dim: int, hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.0, loss: str = "ce", standardize: bool = True):
        super().__init__(labels, feature_dim, loss, standardize)
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = feature_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(self.dropout)]
            width = h
        layers.append(nn.Linear(width, num_outputs(loss, len(self.labels))))
        self.net = nn.Sequential(*layers)
        self.eval()

    def config(self) -> dict[str, Any]:
        return {"type": "mlp", "loss": self.loss, "hidden": list(self.hidden), "dropout": self.dropout,
                "standardize": self.standardize}

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]


class KNNHead(Head):
    """k nearest training examples vote; ties go to the class whose nearest member is closest."""

    head_type = "knn"

    def __init__(self, labels: Sequence[str], train_features: np.ndarray | torch.Tensor,
                 train_labels: np.ndarray | torch.Tensor, k: int = 5, metric: str = "cosine"):
        self.labels = tuple(labels)
        feats = torch.as_tensor(np.asarray(train_features, dtype=np.float32))
        self.feature_dim = int(feats.shape[1])
        self.k = int(k)
        self.metric = metric
        # Cosine neighbours are found by a dot product of unit vectors: normalise once, here.
        self.train_features = _unit(feats) if metric == "cosine" else feats
        self.train_labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
        if self.k > len(self.train_labels):
            raise ValueError(f"k={self.k} is more than the {len(self.train_labels)} training examples")

    def config(self) -> dict[str, Any]:
        return {"type": "knn", "k": self.k, "metric": self.metric}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"train_features": self.train_features, "train_labels": self.train_labels}

    def neighbours(self, features: np.ndarray) -> np.ndarray:
        """[N, k] indices of the nearest training examples, nearest first."""
        x = self._as_tensor(features)
        out = []
        for i in range(0, len(x), _CHUNK):
            q = x[i:i + _CHUNK]
            if self.metric == "cosine":
                _, idx = torch.topk(_unit(q) @ self.train_features.T, self.k, dim=1)
            else:  # exact differences, not the |a|^2-2ab+|b|^2 shortcut, so the nearest is the nearest
                dist = torch.cdist(q, self.train_features, compute_mode="donot_use_mm_for_euclid_dist")
                _, idx = torch.topk(dist, self.k, dim=1, largest=False)
            out.append(idx)
        return torch.cat(out).numpy() if out else np.zeros((0, self.k), np.int64)

    def ranking(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        votes = self.train_labels.numpy()[self.neighbours(features)]          # [N, k]
        num_classes = len(self.labels)
        counts = np.zeros((len(votes), num_classes), np.float64)
        # Rank r adds 2^-(r+1) (< 1 vote in total): among tied classes the nearest member wins.
        bonus = np.zeros_like(counts)
        rows = np.arange(len(votes))
        for r in range(self.k):
            counts[rows, votes[:, r]] += 1.0
            bonus[rows, votes[:, r]] += math.ldexp(1.0, -(r + 1))
        order = np.argsort(-(counts + bonus), axis=1, kind="stable")
        return (counts / self.k).astype(np.float32), order

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.ranking(features)[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ---- the artifact ------------------------------------------------------------------------

def build_head(config: dict[str, Any], labels: Sequence[str], feature_dim: int,
               tensors: dict[str, torch.Tensor] | None = None) -> Head:
    """A head from the ``head`` section of head.json (+ its tensors when loading one)."""
    kind = config["type"]
    if kind == "knn":
        if tensors is None:
            raise ValueError("a knn head is made from its training features")
        return KNNHead(labels, tensors["train_features"], tensors["train_labels"], config["k"], config["metric"])
    standardize = config.get("standardize", True)  # absent: a head.json from before the key, which standardised
    if kind == "linear":
        head: _StandardisedHead = LinearHead(labels, feature_dim, config["loss"], standardize)
    else:
        head = MLPHead(labels, feature_dim, config["hidden"], config["dropout"], config["loss"], standardize)
    if tensors is not None:
        head.load_state_dict(tensors, strict=True)
    return head


def save_head(head: Head, folder: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write head.safetensors then head.json (each atomically); return what head.json holds.

    ``meta`` must name ``backbone`` and ``embed`` (``{"normalize": bool}``) and may carry
    preprocess, training, metrics, data and anything else JSON can hold.
    """
    folder = Path(folder)
    doc = {"format": FORMAT, "version": VERSION, **to_jsonable(meta), "head": head.config(),
           "labels": list(head.labels), "feature_dim": head.feature_dim}
    validate_meta(doc, folder / JSON_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(head.tensors(), folder / TENSORS_NAME, metadata={"format": FORMAT})
    atomic_write_bytes(folder / JSON_NAME, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
    return doc


def load_head(folder: str | Path) -> tuple[Head, dict[str, Any]]:
    """Load a head folder: safetensors + JSON only; a symlink that leads out of it is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidHead(f"{folder} is not a head folder (no such directory).")
    json_path = _inside(folder, JSON_NAME)
    tensors_path = _inside(folder, TENSORS_NAME)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidHead(f"{json_path} is not valid JSON: {exc}.") from None
    validate_meta(meta, json_path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidHead(f"{tensors_path} is not a readable safetensors file: {exc}.") from None
    try:
        head = build_head(meta["head"], meta["labels"], meta["feature_dim"], tensors)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidHead(f"{tensors_path} does not match {JSON_NAME} ({meta['head']['type']} head, "
                          f"feature_dim {meta['feature_dim']}, {len(meta['labels'])} labels): {first}") from None
    _check_tensor_agreement(head, meta, tensors_path)
    return head, meta


def _inside(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.exists():
        raise InvalidHead(f"{folder} is not a head folder: {name} is missing.")
    root = folder.resolve()
    target = path.resolve()
    if target.parent != root and root not in target.parents:
        raise InvalidHead(f"{path} is a symlink leading out of its folder (to {target}); refused.")
    if not target.is_file():
        raise InvalidHead(f"{path} is not a file.")
    return path


def _check_tensor_agreement(head: Head, meta: dict[str, Any], path: Path) -> None:
    if isinstance(head, KNNHead):
        feats, labels = head.train_features, head.train_labels
        if feats.ndim != 2 or feats.shape[1] != meta["feature_dim"] or labels.shape != (feats.shape[0],):
            raise InvalidHead(f"{path}: train_features {tuple(feats.shape)} / train_labels {tuple(labels.shape)} "
                              f"do not match feature_dim {meta['feature_dim']}.")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(head.labels)):
            raise InvalidHead(f"{path}: train_labels hold class indices outside 0..{len(head.labels) - 1}.")
    for name, t in head.tensors().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidHead(f"{path}: tensor {name!r} holds NaN or infinity.")


def _bad(path: Path, key: str, must: str) -> InvalidHead:
    return InvalidHead(f"{path}: key {key!r} {must}.")


def validate_meta(meta: Any, path: Path) -> None:
    """Check head.json; the error names the first bad key and what it must be."""
    if not isinstance(meta, dict):
        raise InvalidHead(f"{path}: must hold a JSON object.")
    if meta.get("format") != FORMAT:
        raise _bad(path, "format", f"must be {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(path, "version", "must be a positive integer")
    if version > VERSION:
        raise _bad(path, "version", f"is {version}: the head was made by a newer vfm (this one reads {VERSION})")
    if not isinstance(meta.get("backbone"), str) or not meta["backbone"].strip():
        raise _bad(path, "backbone", "must name the backbone model")
    if not _positive_int(meta.get("feature_dim")):
        raise _bad(path, "feature_dim", "must be a positive integer")
    labels = meta.get("labels")
    if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)):
        raise _bad(path, "labels", "must be a list of at least two distinct non-empty strings")
    embed = meta.get("embed")
    if not isinstance(embed, dict) or not isinstance(embed.get("normalize"), bool):
        raise _bad(path, "embed", 'must be an object like {"normalize": false}')
    for optional in ("preprocess", "metrics", "data", "training"):
        if optional in meta and not isinstance(meta[optional], dict):
            raise _bad(path, optional, "must be an object when present")
    _validate_head_section(meta.get("head"), len(labels), path)


def _validate_head_section(head: Any, num_classes: int, path: Path) -> None:
    if not isinstance(head, dict):
        raise _bad(path, "head", "must be an object with a 'type'")
    kind = head.get("type")
    if kind not in HEAD_TYPES:
        raise _bad(path, "head.type", f"must be one of {', '.join(HEAD_TYPES)} (got {kind!r})")
    if kind == "knn":
        if not _positive_int(head.get("k")):
            raise _bad(path, "head.k", "must be a positive integer")
        if head.get("metric") not in METRICS:
            raise _bad(path, "head.metric", f"must be one of {', '.join(METRICS)}")
        return
    if head.get("loss") not in LOSSES:
        raise _bad(path, "head.loss", f"must be one of {', '.join(LOSSES)}")
    if not isinstance(head.get("standardize", True), bool):
        raise _bad(path, "head.standardize", "must be true or false when present")
    if head["loss"] == "hinge" and num_classes != 2:
        raise _bad(path, "head.loss", f"is hinge, which needs exactly 2 labels (found {num_classes})")
    if kind == "mlp":
        hidden = head.get("hidden")
        if not isinstance(hidden, list) or not hidden or not all(_positive_int(h) for h in hidden):
            raise _bad(path, "head.hidden", "must be a non-empty list of positive integers")
        dropout = head.get("dropout")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise _bad(path, "head.dropout", "must be a number in [0, 1)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, tuples, paths -> plain JSON types; NaN/inf -> null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value

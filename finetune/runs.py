"""What can be done with a finished run folder: re-evaluate its head on data, publish it.

Publishing copies the head (and its report) into the service's heads folder under a name,
through a temporary folder and a rename, so the service never sees half a head.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vfm.models.heads import JSON_NAME, TENSORS_NAME, Head, load_head, to_jsonable, validate_meta
from vfm.models.published import JSON_NAME as MODEL_JSON
from vfm.models.checkpoints import atomic_write_bytes, publish_folder

from .config import EvalConfig
from .data import DataError, LabeledImages, open_dataset
from .evaluate import Evaluation, evaluate
from .extractors import BackboneExtractor, make_extractor
from .features import ExtractionStats, extract_features
from .report import RunReport, write_report
from .splits import stratified_take

log = logging.getLogger(__name__)

HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REPORT_FILES = ("report.md", "curves.png", "confusion.png")


@dataclass
class EvalResult:
    evaluation: Evaluation
    out: Path
    stats: ExtractionStats
    subset: str
    updated: Path | None = None   # the head.json that --update rewrote


def _relabel(data: LabeledImages, head: Head) -> np.ndarray:
    """The data's labels as indices of the head's labels (matched by name)."""
    unknown = [c for c in data.classes if c not in head.labels]
    if unknown:
        raise DataError(f"{data.spec}: class {unknown[0]!r} is not one of the head's labels "
                        f"({', '.join(head.labels)}).")
    return np.array([head.labels.index(data.classes[i]) for i in data.labels], np.int64)


def _eval_indices(cfg: EvalConfig, data: LabeledImages, labels: np.ndarray) -> tuple[np.ndarray, str]:
    """The examples ``cfg`` evaluates on (its --subset, --limit) and the subset's name."""
    subset = cfg.subset
    if subset == "auto":
        subset = "test" if "test" in data.given_splits() else "all"
    if subset == "test":
        if "test" not in data.given_splits():
            raise DataError(f"{cfg.data} has no test split of its own (idx t10k-* files, a test/ folder or a "
                            "manifest split column); use --subset all.")
        idx = np.flatnonzero(data.given_split == 2)
    else:
        idx = np.arange(len(data))
    if cfg.limit is not None and cfg.limit < len(idx):
        idx = stratified_take(labels, idx, cfg.limit, np.random.default_rng(cfg.seed))
    return idx, subset


def eval_run(cfg: EvalConfig) -> EvalResult:
    """Evaluate the head saved in ``cfg.run`` on ``cfg.data`` (its test split, or all of it); a run that holds a model
    (``--unfreeze`` / ``--unpooled``: model.json) is evaluated as that model."""
    if (cfg.run / MODEL_JSON).is_file() and not (cfg.run / JSON_NAME).is_file():
        return _eval_model(cfg)
    run, data_spec, feat = cfg.run, cfg.data, cfg.features
    head, meta = load_head(run)
    data = open_dataset(data_spec)
    labels = _relabel(data, head)
    idx, subset = _eval_indices(cfg, data, labels)
    extractor = make_extractor(meta["backbone"], feat.device, meta["embed"]["normalize"], backend=feat.backend,
                               repository=feat.repository)
    if isinstance(extractor, BackboneExtractor) and meta.get("weights_sha256"):
        now = extractor.key()["weights_sha256"]
        if now != meta["weights_sha256"]:
            raise DataError(f"the head in {run} was trained on {meta['backbone']} weights {meta['weights_sha256'][:12]}"
                            f"... but this machine's weights are {now[:12]}...; its scores would mean nothing.")
    feats = extract_features(data.source.subset(idx), extractor, feat.cache_folder(), feat.extract_batch_size,
                             feat.progress, ray=feat.ray, workers=feat.workers)
    ok = feats.valid
    if not ok.any():
        raise DataError(f"{data_spec}: every image was unreadable.")
    ev = evaluate(labels[idx][ok], head.predict(feats.features[ok]), head.labels, cfg.delta)
    return _finish(cfg, ev, feats.stats, subset, int(ok.sum()), meta,
                   ("head", f"`{run}` ({meta['head']['type']}, backbone `{meta['backbone']}`)"), JSON_NAME)


def _eval_model(cfg: EvalConfig) -> EvalResult:
    """`vfm finetune eval` of a model run: its frozen part's activations (cached, shared with training runs of the
    same base and cut), then its trained blocks and head."""
    from vfm.models.published import InvalidModel

    from .unfreeze import model_logits, model_part

    feat = cfg.features
    if feat.backend != "torch" or feat.ray is not None:
        given = f"--backend {feat.backend}" if feat.backend != "torch" else "--ray-address"
        raise DataError(f"{given} does not apply to a model run: it is evaluated on PyTorch, in this process (its "
                        "frozen part's activations, then its blocks and head); serve its `vfm export` for ONNX Runtime.")
    try:
        part, head, meta = model_part(cfg.run, feat.device)
    except InvalidModel as exc:
        raise DataError(str(exc)) from None
    data = open_dataset(cfg.data)
    labels = _relabel(data, head)
    idx, subset = _eval_indices(cfg, data, labels)
    acts = extract_features(data.source.subset(idx), part, feat.cache_folder(), feat.extract_batch_size,
                            feat.progress, workers=feat.workers)
    ok = acts.valid
    if not ok.any():
        raise DataError(f"{cfg.data}: every image was unreadable.")
    pred = model_logits(part, head, acts.features[ok]).argmax(axis=1)
    ev = evaluate(labels[idx][ok], pred, head.labels, cfg.delta)
    what = ", ".join(f"{k} {meta[k]}" for k in ("unfreeze", "unpooled") if meta.get(k) is not None)
    return _finish(cfg, ev, acts.stats, subset, int(ok.sum()), meta,
                   ("model", f"`{cfg.run}` ({meta['head']['type']} head, base `{meta['base']}`, {what})"), MODEL_JSON)


def _finish(cfg: EvalConfig, ev: Evaluation, stats: ExtractionStats, subset: str, examples: int,
            meta: dict[str, Any], what: tuple[str, str], json_name: str) -> EvalResult:
    """The evaluation's report and eval.json in ``cfg.out``; with --update, its metrics in RUN/``json_name``."""
    out = cfg.out
    facts = [what, ("data", f"`{cfg.data}`, {subset} ({examples} examples"
                            + (f", {stats.skipped} unreadable skipped)" if stats.skipped else ")")),
             ("features" if json_name == JSON_NAME else "frozen activations",
              f"{stats.cached} from cache, {stats.computed} computed")]
    write_report(out, RunReport(f"Evaluation of {cfg.run.name} on {cfg.data}", facts, [], 0, ev), with_curves=False)
    atomic_write_bytes(out / "eval.json", (json.dumps({"data": cfg.data, "subset": subset, "limit": cfg.limit,
                                                        "test": ev.to_json(), "extraction": stats.to_json()},
                                                       indent=2) + "\n").encode())
    updated = record_metrics(cfg.run, meta, ev, {"data": cfg.data, "subset": subset, "limit": cfg.limit,
                                                 "skipped_unreadable": stats.skipped}, json_name) if cfg.update else None
    return EvalResult(ev, out, stats, subset, updated)


def record_metrics(folder: Path, meta: dict[str, Any], ev: Evaluation, evaluated_on: dict[str, Any],
                   json_name: str = JSON_NAME) -> Path:
    """Rewrite ``folder``/head.json (or a model's model.json) with ``ev`` as its metrics (atomically; the tensors are
    untouched).

    The validation accuracy the head was chosen by stays; the metrics of the training run move to
    ``training_metrics`` the first time (a later update keeps them there).
    """
    from datetime import datetime, timezone

    doc = dict(meta)
    old = dict(meta.get("metrics") or {})
    doc.setdefault("training_metrics", old)
    test = ev.to_json()
    doc["metrics"] = {**({"val_accuracy": old["val_accuracy"]} if "val_accuracy" in old else {}),
                      "test_accuracy": ev.accuracy, "test_error": ev.error, "test_k": ev.k, "delta": ev.delta,
                      "test_error_bound": ev.bound, "bound": ev.bound_sentence(), "per_class": test["per_class"],
                      "evaluated_on": {**evaluated_on,
                                       "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    path = folder / json_name
    if json_name == JSON_NAME:
        validate_meta(doc, path)
    atomic_write_bytes(path, (json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n").encode())
    if json_name == JSON_NAME:
        load_head(folder)  # what was written loads
    else:
        from vfm.models.published import read_meta

        read_meta(folder)
    return path


def publish(run: Path, heads_dir: Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Copy ``run``'s head into ``heads_dir/NAME`` atomically; return that folder."""
    _, meta = load_head(run)  # refuse to publish anything the service could not load
    name = name or run.resolve().name
    if not HEAD_NAME.match(name):
        raise ValueError(f"head name {name!r}: use letters, digits, '.', '_' and '-' (it becomes the URL "
                         "/v1/heads/NAME).")
    return publish_folder(run, heads_dir, name, TENSORS_NAME, JSON_NAME, meta, REPORT_FILES, load_head, overwrite)

"""`vfm finetune train` end to end: data -> features -> heads -> evaluation -> artifact + report.

The run folder holds head.safetensors + head.json (the chosen head, loadable by the service),
run.json (every head's scores and the settings), checkpoint.safetensors, report.md, curves.png
and confusion.png.

With ``--unpooled N`` the features are the activations that enter the backbone's last N blocks, unpooled and
flattened (``unfreeze.FrozenPart``, cached under their own key), and the run is a model instead of a head:
model.json + model.safetensors (``vfm.models.published``), the backbone cut before those blocks, then the head.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfm.models.blocks import describe_blocks
from vfm.models.checkpoints import atomic_write_bytes
from vfm.models.heads import KNNHead, save_head, to_jsonable
from vfm.models.published import JSON_NAME as MODEL_JSON, TENSORS_NAME as MODEL_TENSORS

from .checkpoint import NAME as CHECKPOINT_NAME
from .config import TrainConfig
from .data import DataError, LabeledImages, open_dataset
from .evaluate import Evaluation, evaluate
from .extractors import Extractor, make_extractor
from .features import ExtractionStats, extract_features
from .report import HeadSummary, RunReport, write_report
from .splits import Splits, check_training_classes, make_splits
from .train import train_heads

log = logging.getLogger(__name__)


class RunExists(ValueError):
    """The --out folder already holds a run and neither --resume nor --overwrite was given."""


@dataclass
class Prepared:
    """Features of every split, after unreadable images were dropped."""

    data: LabeledImages
    splits: Splits
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    extractor: Extractor
    stats: ExtractionStats
    fingerprint: str


@dataclass
class RunSummary:
    out: Path
    chosen: str
    evaluation: Evaluation
    heads: list[HeadSummary]
    stats: ExtractionStats
    counts: dict[str, int]
    resumed_from: int | None = None


def data_fingerprint(data: LabeledImages, splits: Splits) -> str:
    """sha256 over every example's pixel key, class name and split: what the head learned from."""
    h = hashlib.sha256()
    for name, idx in splits.items():
        for i in idx:
            h.update(f"{name}\t{data.classes[data.labels[i]]}\t{data.source.item_key(int(i))}\n".encode())
    return h.hexdigest()


def prepare(cfg: TrainConfig) -> Prepared:
    data = open_dataset(cfg.data)
    if cfg.classes:
        data = data.select_classes(cfg.classes)
    if cfg.head != "knn" and cfg.settings.loss == "hinge" and len(data.classes) != 2:  # before any extraction
        raise DataError(f"hinge loss is binary but the data has {len(data.classes)} classes; use --loss ce or "
                        "squared, or keep two classes with --classes A,B.")
    splits = make_splits(data, cfg.split, cfg.seed, cfg.limit)
    feat = cfg.features
    if cfg.unpooled is not None:  # the activations entering the last N blocks, flattened (cached under their own key)
        from .unfreeze import FrozenPart

        extractor: Extractor = FrozenPart(cfg.backbone, cfg.unpooled, feat.device, "--unpooled")
    else:
        extractor = make_extractor(cfg.backbone, feat.device, cfg.normalize, backend=feat.backend,
                                   repository=feat.repository)
    union = splits.union()
    feats = extract_features(data.source.subset(union), extractor, feat.cache_folder(), feat.extract_batch_size,
                             feat.progress, ray=feat.ray, workers=feat.workers)
    position = {int(i): p for p, i in enumerate(union)}
    kept: dict[str, np.ndarray] = {}
    for name, idx in splits.items():
        rows = np.array([position[int(i)] for i in idx], np.int64)
        ok = feats.valid[rows]
        kept[name] = idx[ok]
    splits = Splits(kept["train"], kept["val"], kept["test"])
    check_training_classes(data, splits.train)
    for name, idx in splits.items():
        if not len(idx):
            raise DataError(f"{data.spec}: every image of the {name} split was unreadable.")
    x = {name: feats.features[[position[int(i)] for i in idx]] for name, idx in splits.items()}
    y = {name: data.labels[idx] for name, idx in splits.items()}
    return Prepared(data, splits, x, y, extractor, feats.stats, data_fingerprint(data, splits))


def _check_out(cfg: TrainConfig) -> None:
    has_run = any((cfg.out / name).exists() for name in ("head.json", CHECKPOINT_NAME, MODEL_JSON))
    if has_run and not (cfg.resume or cfg.overwrite):
        raise RunExists(f"{cfg.out} already holds a run; pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --out.")
    if cfg.overwrite:
        for name in (CHECKPOINT_NAME, "head.json", "head.safetensors", "run.json", MODEL_JSON, MODEL_TENSORS):
            (cfg.out / name).unlink(missing_ok=True)


def train_run(cfg: TrainConfig) -> RunSummary:
    _check_out(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    if cfg.head != "knn":
        cfg.settings.resolve(len(prep.x["train"]))  # lbfgs's default grid is relative to N
    classes = prep.data.classes
    run_digest = _run_digest(cfg, prep)
    if cfg.head == "knn":
        summaries, chosen_idx, head = _knn(cfg, prep)
        resumed = None
        history_note = "k-NN stores the training features; nothing is trained."
    else:
        result = train_heads(cfg.settings, torch.from_numpy(prep.x["train"]), torch.from_numpy(prep.y["train"]),
                             torch.from_numpy(prep.x["val"]), torch.from_numpy(prep.y["val"]), len(classes),
                             run_dir=cfg.out, resume=cfg.resume, run_digest=run_digest,
                             progress=cfg.features.progress)
        if all(r.best_val_accuracy < 0 for r in result.runs):
            raise RuntimeError("every head diverged (its loss became infinite); use smaller --lr values.")
        summaries = []
        for i, run in enumerate(result.runs):
            summaries.append(_trained_summary(cfg, run, result.model.unstack(i, classes, result.mean, result.std),
                                              prep))
        chosen_idx = result.best
        head = result.model.unstack(chosen_idx, classes, result.mean, result.std)
        resumed = result.resumed_from
        history_note = f"{cfg.settings.optimizer}: " + _HISTORY_NOTES[cfg.settings.optimizer]
        if cfg.settings.optimizer == "lbfgs" and cfg.settings.head == "mlp":
            history_note += " An MLP keeps its best check on validation (early stopping)."
    pred = head.predict(prep.x["test"])
    ev = evaluate(prep.y["test"], pred, classes, cfg.delta)
    counts = prep.splits.counts()
    meta = _head_meta(cfg, prep, summaries, chosen_idx, ev, None if cfg.head == "knn" else result.runs[chosen_idx])
    if cfg.unpooled is not None:
        _write_unpooled_model(cfg, prep, head, meta)
    else:
        save_head(head, cfg.out, meta)
    run_json = {"config": _config_json(cfg), "counts": counts, "extraction": prep.stats.to_json(),
                "heads": [_summary_json(s) for s in summaries], "chosen": summaries[chosen_idx].name,
                "test": ev.to_json(), "data_fingerprint": prep.fingerprint, "seconds": time.perf_counter() - t0}
    atomic_write_bytes(cfg.out / "run.json", (json.dumps(to_jsonable(run_json), indent=2) + "\n").encode())
    facts = _facts(cfg, prep, counts, summaries[chosen_idx].name)
    notes = [history_note]
    if prep.stats.skipped:
        notes.append(f"{prep.stats.skipped} unreadable image(s) were skipped, e.g. "
                     + "; ".join(prep.stats.skipped_examples[:3]))
    write_report(cfg.out, RunReport(f"Fine-tuning run {cfg.out.name}", facts, summaries, chosen_idx, ev, notes))
    return RunSummary(cfg.out, summaries[chosen_idx].name, ev, summaries, prep.stats, counts, resumed)


def _write_unpooled_model(cfg: TrainConfig, prep: Prepared, head: Any, head_meta: dict[str, Any]) -> None:
    """--unpooled N: model.json + model.safetensors (``vfm.models.published``), the backbone cut before its last N
    blocks, its output flattened, then the head; `vfm finetune publish` puts it where the service finds it."""
    from vfm.models.blocks import unpooled_body
    from vfm.models.published import write_model

    from .unfreeze import model_identity

    part = prep.extractor
    identity = model_identity(cfg.out, part, head, part.feature_dim, unpooled=cfg.unpooled,
                              activations_shape=list(part.shape))  # its weights' digest: before the cut
    module = part.module  # the run's own copy of the backbone: nothing else uses it after the extraction
    module.body = unpooled_body(cfg.backbone, module.body, cfg.unpooled)
    module.head = head
    meta = {**identity, "training": head_meta["training"], "metrics": head_meta["metrics"], "data": head_meta["data"]}
    write_model(cfg.out, module.state_dict(), to_jsonable(meta))


_HISTORY_NOTES = {
    "sgd": "each head keeps its best epoch on validation.",
    "gd": "each head keeps its last iterate; its train loss is the full-batch objective, which never rises.",
    "lbfgs": "one fit per weight decay, strongest first, each starting from the previous one's solution; the "
             "x axis counts L-BFGS iterations and the train loss is the full-batch objective.",
}


def _trained_summary(cfg: TrainConfig, run: Any, head: Any, prep: Prepared) -> HeadSummary:
    """A linear or MLP head's row; a head that diverged before any finite epoch has no scores."""
    s = cfg.settings
    parts = ([] if s.optimizer == "lbfgs" else [f"lr {run.lr:g}"])
    if s.optimizer == "lbfgs" or len(s.weight_decay) > 1:
        parts.append(f"wd {run.weight_decay:g}")
    setting = ", ".join(parts)
    # never scored: its weights are whatever the divergence left. (An lbfgs fit warm-started at a point that already
    # meets the gradient tolerance is scored at iteration 0: its best_epoch is 0, and it converged.)
    if run.best_val_accuracy < 0:
        return HeadSummary(run.name, setting, None, None, None, None, run.stopped, run.history)
    val_loss = run.best_val_loss if np.isfinite(run.best_val_loss) else None
    return HeadSummary(run.name, setting, run.best_epoch, run.best_val_accuracy, val_loss,
                       _accuracy(head, prep, "test"), run.stopped, run.history)


def _knn(cfg: TrainConfig, prep: Prepared) -> tuple[list[HeadSummary], int, KNNHead]:
    classes = prep.data.classes
    n_train = len(prep.y["train"])
    summaries, heads = [], []
    for k in cfg.knn.ks:
        if k > n_train:
            raise DataError(f"--k {k} is more than the {n_train} training examples.")
        head = KNNHead(classes, prep.x["train"], prep.y["train"], k, cfg.knn.metric)
        heads.append(head)
        summaries.append(HeadSummary(f"knn_k{k}_{cfg.knn.metric}", f"k {k}", None, _accuracy(head, prep, "val"), None,
                                     _accuracy(head, prep, "test")))
    chosen = max(range(len(heads)), key=lambda i: (summaries[i].val_accuracy, -i))
    return summaries, chosen, heads[chosen]


def _accuracy(head: Any, prep: Prepared, split: str) -> float:
    return float(np.mean(head.predict(prep.x[split]) == prep.y[split]))


def _run_digest(cfg: TrainConfig, prep: Prepared) -> str:
    doc = {"config": _config_json(cfg, for_digest=True), "features": prep.extractor.key(), "data": prep.fingerprint}
    return hashlib.sha256(json.dumps(to_jsonable(doc), sort_keys=True).encode()).hexdigest()


def _config_json(cfg: TrainConfig, for_digest: bool = False) -> dict[str, Any]:
    out = {"backbone": cfg.backbone, "data": cfg.data, "head": cfg.head, "split": list(cfg.split), "seed": cfg.seed,
           "limit": cfg.limit, "classes": list(cfg.classes) if cfg.classes else None, "normalize": cfg.normalize,
           "delta": cfg.delta}
    if cfg.unpooled is not None:
        out["unpooled"] = cfg.unpooled
    if cfg.head == "knn":
        out.update(k=list(cfg.knn.ks), metric=cfg.knn.metric)
    else:
        out["training"] = cfg.settings.to_json()
    if not for_digest:  # where things went does not change what is learned
        feat = cfg.features
        out.update(out=str(cfg.out), device=feat.device, backend=feat.backend, cache_dir=str(feat.cache_dir) if feat.cache_dir else None,
                   ray_address=feat.ray.address if feat.ray else None)
    return out


def _head_meta(cfg: TrainConfig, prep: Prepared, summaries: list[HeadSummary], chosen: int,
               ev: Evaluation, chosen_run: Any = None) -> dict[str, Any]:
    from datetime import datetime, timezone

    from vfm import __version__

    chosen_head = summaries[chosen]
    training: dict[str, Any] = {"chosen": chosen_head.name, "selected_on": "validation accuracy",
                                "candidates": [s.name for s in summaries], "seed": cfg.seed}
    if cfg.head == "knn":
        training.update(k=list(cfg.knn.ks), metric=cfg.knn.metric)
    else:
        run = chosen_run
        training.update(cfg.settings.to_json(), lr=run.lr, chosen_weight_decay=run.weight_decay,
                        best_epoch=chosen_head.best_epoch)
    test = ev.to_json()
    metrics = {"val_accuracy": chosen_head.val_accuracy, "test_accuracy": ev.accuracy, "test_error": ev.error,
               "test_k": ev.k, "delta": ev.delta, "test_error_bound": ev.bound, "bound": ev.bound_sentence(),
               "per_class": test["per_class"]}
    data = {"spec": cfg.data, "fingerprint": prep.fingerprint, "counts": prep.splits.counts(),
            "skipped_unreadable": prep.stats.skipped, "split": list(cfg.split), "limit": cfg.limit,
            "classes": list(cfg.classes) if cfg.classes else None}
    return {"name": cfg.out.name, **prep.extractor.head_meta(), "training": training, "metrics": metrics,
            "data": data, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vfm_version": __version__}


def _facts(cfg: TrainConfig, prep: Prepared, counts: dict[str, int], chosen: str) -> list[tuple[str, str]]:
    st = prep.stats
    speed = f"{st.computed / st.compute_seconds:.1f} images/s" if st.computed and st.compute_seconds else "all cached"
    cut = prep.extractor
    facts = [("backbone", f"`{cfg.backbone}`" + (" (L2-normalised embed)" if cfg.normalize else "")
              + ((f", cut before its last {cfg.unpooled} of {cut.chain.count} {describe_blocks(cfg.backbone)}: the "
                  "head takes their input" if cfg.unpooled else f", cut after its last of {cut.chain.count} "
                  f"{describe_blocks(cfg.backbone)}: the head takes its output")
                 + f" unpooled ({'x'.join(map(str, cut.shape))}); the run is a model (model.json + model.safetensors)"
                 if cfg.unpooled is not None else "")),
             ("data", f"`{cfg.data}` ({len(prep.data.classes)} classes; data fingerprint `{prep.fingerprint[:16]}`)"),
             ("examples", f"train {counts['train']}, val {counts['val']}, test {counts['test']}"
                          + (f"; {st.skipped} unreadable skipped" if st.skipped else "")),
             ("features", f"{st.total} images, {st.cached} from cache, {st.computed} computed ({speed})"),
             ("head", cfg.head + (f", metric {cfg.knn.metric}" if cfg.head == "knn" else "")),
             ("chosen", f"`{chosen}`"), ("seed", str(cfg.seed))]
    if cfg.head != "knn":
        s = cfg.settings
        opt = {"sgd": f"sgd, batch {s.batch_size}, momentum {s.momentum:g}{' (Nesterov)' if s.nesterov else ''}, "
                      f"{s.schedule} schedule, patience {s.patience or 'off'}, {s.epochs} epochs",
               "gd": f"gd (full batch, step halved until the loss falls), tol {s.tol:g}, {s.epochs} epochs",
               "lbfgs": f"lbfgs (full batch, strong-Wolfe line search, warm-started along the weight decays), "
                        f"tol {s.tol:g}, at most {s.epochs} iterations per weight decay"}[s.optimizer]
        rates = "" if s.optimizer == "lbfgs" else f", lr {', '.join(f'{lr:g}' for lr in s.lrs)}"
        facts.insert(5, ("training", f"{opt}, weight decay {', '.join(f'{wd:g}' for wd in s.weight_decay)}, "
                                     f"loss {s.loss}{rates}"))
    return facts


def _summary_json(s: HeadSummary) -> dict[str, Any]:
    return {"name": s.name, "setting": s.setting, "best_epoch": s.best_epoch, "val_accuracy": s.val_accuracy,
            "val_loss": s.val_loss, "test_accuracy": s.test_accuracy, "stopped": s.stopped, "history": s.history}

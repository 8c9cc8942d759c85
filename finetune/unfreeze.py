"""`vfm finetune train --unfreeze N`: train a backbone's last N blocks together with a head; the result is a model.

The backbone's body is split where its last N blocks begin (``vfm.models.blocks``). The frozen
part runs once per image and its activations go to the feature cache (as features do, keyed by
the backbone's weights, the split and the pixels), so an epoch runs only the unfrozen blocks and
the head. With ``--augment`` (random flips and shifts) the training images go through the whole
body every epoch instead; validation and test still use the cached activations.

Training is sgd with momentum on the ce loss, two learning rates (the head's ``--lr``; the
blocks' ``--backbone-lr``, default a tenth of it), the run's schedule, weight decay, label
smoothing (``--label-smoothing``) and early stopping on validation; every rate of ``--lr`` is a
run of its own from the same start and the best on validation is kept. By default the blocks
train in eval mode: batch-norm statistics stay those of the pre-trained network, dropout and
drop-connect are off; their weights, biases and batch-norm scales learn. ``--batch-norm train``
normalises with the batches' statistics instead (and updates the running ones the model keeps).

``--mixup A`` is regularisation that keeps the cache (manifold mixup, Verma et al. 2019): each batch of
cached activations is mixed with a shuffled copy of itself, the weight drawn from Beta(A, A), and the
loss mixes the two labels' losses alike.

``--views N`` is augmentation that keeps the cache: N fixed augmented versions of each training
image (``VIEWS``: a flip, then flips and 10% shifts) go through the frozen part once and are
cached under keys of their own; each epoch takes one of an image's 1 + N versions at random, so
an epoch still runs only the unfrozen blocks. The cost: N more frozen passes over the training
images.

The run folder holds ``model.json`` + ``model.safetensors`` (``vfm.models.published``: the base
network with the trained blocks and head), run.json and the report; ``vfm finetune publish RUN
--name NAME`` copies the model into the models folder, where ``load_model(NAME)``, ``vfm predict``,
``vfm export`` and the service find it.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vfm.models.blocks import NoBlocks, chain_of, describe_blocks, unpooled_chain
from vfm.models.checkpoints import atomic_write_bytes
from vfm.models.errors import UsageError
from vfm.models.heads import LinearHead, MLPHead, to_jsonable
from vfm.models.images import preprocess_batch

from .config import MAX_VIEWS, TrainConfig
from .data import DataError, open_dataset
from .evaluate import evaluate
from .extractors import BackboneError, BackboneExtractor, Extractor
from .features import extract_features
from .pipeline import RunExists, RunSummary, data_fingerprint
from .report import HeadSummary, RunReport, write_report
from .runs import REPORT_FILES
from .splits import Splits, check_training_classes, make_splits
from .train import HeadRun, choose_best

log = logging.getLogger(__name__)

_EVAL_CHUNK = 256
RUN_FILES = ("model.json", "model.safetensors", "run.json")


class FrozenPart(Extractor):
    """The backbone up to its last N blocks: its activations, flattened, are the cached "features".

    With ``unpooled=K`` the body is first cut before its last K blocks, its output flattened
    (``vfm.models.blocks.unpooled_body``, as ``--unpooled K`` cuts it): the trainable part is then the N blocks before
    the cut and the flatten, so the head sees their output unpooled (``--unfreeze N --unpooled K``)."""

    def __init__(self, backbone: str, unfreeze: int, device: str = "auto", flag: str = "--unfreeze",
                 unpooled: int | None = None):
        self.base = BackboneExtractor(backbone, device=device)
        runner = self.base.runner
        if not hasattr(runner.network, "module") or not hasattr(runner.network.module, "body"):
            raise BackboneError(f"{flag} needs a classifier backbone on PyTorch; {backbone!r} is not one.")
        self.runner = runner
        self.module = runner.network.module          # FeaturesAndLogits: body + the zoo's own head
        self.device = runner.device
        try:
            self.chain = chain_of(backbone, self.module.body)
        except NoBlocks as exc:
            raise BackboneError(str(exc)) from None
        count, split_from = self.chain.count, self.chain
        if unpooled is not None:
            if unfreeze + unpooled > count:
                raise BackboneError(f"--unfreeze {unfreeze} --unpooled {unpooled}: {backbone} has {count} "
                                    f"{describe_blocks(backbone)}; the two together may be at most {count}.")
            self.base.key()  # before the cut: random weights are identified by what the whole network computes
            self.module.body, split_from = unpooled_chain(backbone, self.module.body, unpooled)
        elif unfreeze > count:
            raise BackboneError(f"{flag} {unfreeze}: {backbone} has {count} "
                                f"{describe_blocks(backbone)}; give at most {count}.")
        self.unfreeze, self.unpooled = unfreeze, unpooled
        self.frozen_blocks = unfreeze + (unpooled or 0)  # the frozen part: all blocks but the last this many
        self.frozen, self.trainable = split_from.split(unfreeze)
        self.frozen.eval()
        size = runner.spec.preprocess.size
        side = (size, size) if isinstance(size, int) else tuple(size)
        # Channels-last from 64 px up, as the backbone's own extraction (extractors.BackboneExtractor); on a
        # copy, so the weights the model is saved with keep their layout.
        self._format = torch.channels_last if min(side) >= 64 else torch.contiguous_format
        self._frozen = copy.deepcopy(self.frozen).to(memory_format=self._format)
        with torch.inference_mode():
            probe = self.activations(torch.zeros(1, 3, *side, device=self.device))
            self.shape = tuple(int(s) for s in probe.shape[1:])
            self.feature_dim = int(np.prod(self.shape))
            if unpooled is None:  # the trainable part's output: the backbone's pooled features
                self.out_dim, self.out_shape = int(runner.feature_dim), (int(runner.feature_dim),)
            else:  # the blocks before the cut, unpooled: the shape they give, flattened
                mapped = self.trainable[:-1](probe) if unfreeze else probe
                self.out_shape = tuple(int(s) for s in mapped.shape[1:])
                self.out_dim = int(np.prod(self.out_shape))
        self.name = f"{backbone}-frozen-but-{self.frozen_blocks}"

    def key(self) -> dict[str, Any]:  # the same activations as --unfreeze / --unpooled of frozen_blocks share a key
        return {**self.base.key(), "activations": f"all but the last {self.frozen_blocks} "
                                                  f"{describe_blocks(self.base.name)}", "shape": list(self.shape)}

    def inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(preprocess_batch(list(images), self.runner.spec.preprocess)).to(self.device)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part's output on a preprocessed batch, contiguous (as the trainable part takes it)."""
        return self._frozen(x.contiguous(memory_format=self._format)).contiguous()

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.images_embedded += len(images)
        with torch.inference_mode():
            out = self.activations(self.inputs(images))
        return out.flatten(1).float().cpu().numpy()

    def head_meta(self) -> dict[str, Any]:
        return self.base.head_meta()


# --views N: the first N of these fixed augmentations of a preprocessed image (horizontal flip; shift by
# 10% of the side each way, the border reflected), so each view's activations are cached like the image's.
VIEWS: tuple[tuple[bool, int, int], ...] = (  # (flip, rows, columns) in tenths of the side
    (True, 0, 0), (False, 1, -1), (True, -1, 1), (False, -1, -1), (True, 1, 1), (False, 1, 1), (True, -1, -1))
assert len(VIEWS) == MAX_VIEWS


def view_of(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (1-based, of ``VIEWS``) of a preprocessed batch [N, C, H, W]."""
    flip, dy, dx = VIEWS[view - 1]
    if flip:
        x = x.flip(-1)
    if dy or dx:
        h, w = x.shape[-2:]
        sy, sx = max(1, h // 10), max(1, w // 10)
        padded = torch.nn.functional.pad(x, (sx, sx, sy, sy), mode="reflect")
        oy, ox = sy - dy * sy, sx - dx * sx  # content moves by (dy, dx) tenths
        x = padded[:, :, oy:oy + h, ox:ox + w]
    return x


def describe_view(view: int) -> str:
    flip, dy, dx = VIEWS[view - 1]
    moves = [f"{'down' if dy > 0 else 'up'} 10%"] * bool(dy) + [f"{'right' if dx > 0 else 'left'} 10%"] * bool(dx)
    return ", ".join((["flipped"] if flip else []) + (["shifted " + " and ".join(moves)] if moves else []))


class ViewPart(Extractor):
    """The frozen part's activations of one fixed augmented view of each image (cached under its own key)."""

    def __init__(self, part: FrozenPart, view: int):
        self.part, self.view = part, view
        self.feature_dim, self.name = part.feature_dim, f"{part.name}-view{view}"

    def key(self) -> dict[str, Any]:
        return {**self.part.key(), "view": describe_view(self.view)}

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.images_embedded += len(images)
        with torch.inference_mode():
            out = self.part.activations(view_of(self.part.inputs(images), self.view))
        return out.flatten(1).float().cpu().numpy()

    def head_meta(self) -> dict[str, Any]:
        return self.part.head_meta()


def part_outputs(part: FrozenPart, acts: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``part.trainable`` as it is now, in eval mode (``--batch-norm train``: the running statistics) and without
    gradients, on flattened activations ``acts``, ``_EVAL_CHUNK`` rows at a time: the features its head takes."""
    acts = torch.from_numpy(acts) if isinstance(acts, np.ndarray) else acts
    out = []
    training = part.trainable.training
    part.trainable.eval()
    with torch.no_grad():
        for i in range(0, len(acts), _EVAL_CHUNK):
            out.append(part.trainable(acts[i:i + _EVAL_CHUNK].to(part.device).view(-1, *part.shape)).float().cpu())
    part.trainable.train(training)
    return torch.cat(out) if out else torch.zeros(0, part.out_dim)


def _make_head(cfg: TrainConfig, labels: Sequence[str], dim: int) -> torch.nn.Module:
    s = cfg.settings
    if s.head == "linear":
        return LinearHead(labels, dim, "ce")
    return MLPHead(labels, dim, s.hidden, s.dropout, "ce")


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.1) -> torch.Tensor:
    """Light augmentation of a preprocessed batch: a random horizontal flip and a shift of up to 10% (reflected)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    dy, dx = max(1, int(h * max_shift)), max(1, int(w * max_shift))
    padded = torch.nn.functional.pad(x, (dx, dx, dy, dy), mode="reflect")
    oy = torch.randint(0, 2 * dy + 1, (n,), generator=gen).tolist()
    ox = torch.randint(0, 2 * dx + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])


class _Trainer:
    """One run of sgd from the pre-trained blocks and a fresh head, at one head learning rate."""

    def __init__(self, cfg: TrainConfig, part: FrozenPart, acts: dict[str, torch.Tensor], y: dict[str, torch.Tensor],
                 train_images: Any, classes: Sequence[str], views: torch.Tensor | None = None):
        self.cfg, self.s, self.part, self.acts, self.y = cfg, cfg.settings, part, acts, y
        self.views = views  # [V, N, D]: the cached activations of V augmented views of each training image
        self.train_images, self.classes = train_images, classes
        self.start_blocks = copy.deepcopy(part.trainable.state_dict())
        self.feature_dim = part.out_dim
        with torch.no_grad():  # the head standardises with the pre-trained features' mean and std
            feats = self.features(acts["train"])
        self.train_features = feats  # --head-epochs: the head alone trains on these first
        self.mean = feats.mean(dim=0)
        # Floored at a tenth of the typical std: a nearly constant feature divided by its tiny std would
        # blow up as soon as the blocks under it move.
        std = feats.std(dim=0, unbiased=False)
        self.std = std.clamp_min(max(float(std.mean()) * 0.1, 1e-6))

    def features(self, acts: torch.Tensor) -> torch.Tensor:
        return part_outputs(self.part, acts)

    def evaluate(self, head: torch.nn.Module, split: str) -> tuple[float, float, np.ndarray]:
        head.eval()
        with torch.no_grad():
            logits = head(self.features(self.acts[split]).to(self.part.device)).float().cpu()
            loss = float(torch.nn.functional.cross_entropy(logits, self.y[split]))
        pred = logits.argmax(dim=1).numpy()
        return loss, float(np.mean(pred == self.y[split].numpy())), pred

    def _batch_acts(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.cfg.augment:
            images = [self.train_images.load(int(i)) for i in idx]
            with torch.no_grad():
                return self.part.activations(_augment(self.part.inputs(images), gen))
        x = self.acts["train"][idx]
        if self.views is not None:  # each image as one of its 1 + V versions, at random
            which = torch.randint(0, len(self.views) + 1, (len(idx),), generator=gen)
            picked = which > 0
            if bool(picked.any()):
                x = x.clone()
                x[picked] = self.views[which[picked] - 1, idx[picked]]
        return x.to(self.part.device).view(-1, *self.part.shape)

    def _warm_up(self, head: torch.nn.Module, lr: float, progress: bool) -> None:
        """Linear probing before fine-tuning (LP-FT, Kumar et al. 2022): the head alone, ``head_epochs`` epochs of
        sgd at ``lr`` with the run's schedule on the pre-trained features, so the blocks start training under a head
        that already fits rather than under a random one, whose large early gradients distort what they learned."""
        from tqdm.auto import tqdm

        s, epochs = self.s, self.cfg.head_epochs
        x, y = self.train_features.to(self.part.device), self.y["train"].to(self.part.device)
        opt = torch.optim.SGD(head.net.parameters(), lr=lr, momentum=s.momentum, nesterov=s.nesterov,
                              weight_decay=s.weight_decay[0])
        shuffle = torch.Generator().manual_seed(s.seed + 5)
        n, bs = len(y), s.batch_size
        steps = math.ceil(n / bs)
        warm = copy.copy(s)
        warm.epochs = epochs
        head.train()
        for epoch in tqdm(range(epochs), unit="epoch", disable=not progress, desc=f"head alone lr {lr:g}"):
            perm = torch.randperm(n, generator=shuffle)
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs]
                for g in opt.param_groups:
                    g["lr"] = lr * _factor(warm, epoch, step, steps)
                loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx], label_smoothing=self.cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def run(self, lr: float, progress: bool) -> tuple[HeadRun, dict[str, Any], torch.nn.Module]:
        """Train at head rate ``lr``; returns its HeadRun, the blocks' best state and the head at its best."""
        from tqdm.auto import tqdm

        s, part = self.s, self.part
        backbone_lr = self.cfg.backbone_lr or lr / 10
        part.trainable.load_state_dict(self.start_blocks)
        torch.manual_seed(s.seed)
        head = _make_head(self.cfg, self.classes, self.feature_dim)
        with torch.no_grad():
            head.feature_mean.copy_(self.mean)
            head.feature_std.copy_(self.std)
        head.to(part.device)
        blocks = [p for p in part.trainable.parameters()]
        for p in blocks:
            p.requires_grad_(True)
        groups = [{"params": list(head.net.parameters()), "lr": lr, "base": lr},
                  {"params": blocks, "lr": backbone_lr, "base": backbone_lr}]
        opt = torch.optim.SGD(groups, lr=lr, momentum=s.momentum, nesterov=s.nesterov,
                              weight_decay=s.weight_decay[0])
        if self.cfg.head_epochs:
            self._warm_up(head, lr, progress)
        name = f"{s.head_name(lr)}_unfreeze{part.unfreeze}_blr{backbone_lr:g}"
        hr = HeadRun(name, lr)
        best_blocks, best_head = copy.deepcopy(part.trainable.state_dict()), copy.deepcopy(head.state_dict())
        shuffle = torch.Generator().manual_seed(s.seed + 1)
        aug = torch.Generator().manual_seed(s.seed + 3)
        mix = np.random.default_rng(s.seed + 7)
        ce = functools.partial(torch.nn.functional.cross_entropy, label_smoothing=self.cfg.label_smoothing)
        n, bs = len(self.y["train"]), s.batch_size
        steps, bad = math.ceil(n / bs), 0
        bar = tqdm(total=s.epochs, unit="epoch", disable=not progress, desc=f"unfreeze {part.unfreeze} lr {lr:g}")
        # frozen: the pre-trained batch-norm statistics; train: the batches' (running statistics updated).
        # No dropout or drop-connect either way.
        part.trainable.train(self.cfg.batch_norm == "train")
        for epoch in range(s.epochs):
            head.train()
            perm = torch.randperm(n, generator=shuffle)
            loss_sum, correct = 0.0, 0
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs]
                factor = _factor(s, epoch, step, steps)
                for g in opt.param_groups:
                    g["lr"] = g["base"] * factor
                x = self._batch_acts(idx, aug)
                yb = self.y["train"][idx].to(part.device)
                if self.cfg.mixup:  # manifold mixup: the blocks' inputs and the labels, mixed alike
                    lam = float(mix.beta(self.cfg.mixup, self.cfg.mixup))
                    other = torch.randperm(len(idx), generator=aug).to(part.device)
                    logits = head(part.trainable(lam * x + (1 - lam) * x[other]))
                    loss = lam * ce(logits, yb) + (1 - lam) * ce(logits, yb[other])
                    yb = yb if lam >= 0.5 else yb[other]  # training accuracy: against the larger part of each mix
                else:
                    logits = head(part.trainable(x))
                    loss = ce(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(dim=1) == yb).sum())
            val_loss, val_acc, _ = self.evaluate(head, "val")
            train_loss = loss_sum / n
            hr.history.append({"epoch": epoch + 1, "lr": lr * _factor(s, epoch, steps - 1, steps),
                               "train_loss": train_loss, "train_accuracy": correct / n, "val_loss": val_loss,
                               "val_accuracy": val_acc})
            bar.update(1)
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_acc=f"{val_acc:.4f}")
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                hr.stopped = "diverged"
                break
            if (val_acc, -val_loss) > (hr.best_val_accuracy, -hr.best_val_loss):
                hr.best_epoch, hr.best_val_accuracy, hr.best_val_loss = epoch + 1, val_acc, val_loss
                best_blocks = copy.deepcopy(part.trainable.state_dict())
                best_head = copy.deepcopy(head.state_dict())
                bad = 0
            else:
                bad += 1
                if s.patience and bad >= s.patience:
                    hr.stopped = "patience"
                    break
        bar.close()
        part.trainable.eval()
        for p in blocks:
            p.requires_grad_(False)
        head.load_state_dict(best_head)
        head.eval()
        return hr, best_blocks, head


def _factor(s: Any, epoch: int, step: int, steps: int) -> float:
    if s.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (s.epochs * steps)))
    if s.schedule == "step":
        return 0.1 ** (epoch // (s.step_epochs or max(1, s.epochs // 3)))
    return 1.0


def _check_out(cfg: TrainConfig) -> None:
    has_run = any((cfg.out / name).exists() for name in (*RUN_FILES, "head.json"))
    if has_run and not cfg.overwrite:
        raise RunExists(f"{cfg.out} already holds a run; pass --overwrite to replace it, or choose another --out.")
    for name in (*RUN_FILES, "head.json", "head.safetensors"):
        (cfg.out / name).unlink(missing_ok=True)


def model_identity(out: Path, part: FrozenPart, head: Any, feature_dim: int, **cut: Any) -> dict[str, Any]:
    """What a model run's model.json (``vfm.models.published``) says of the model, whichever flags made it: name, base,
    labels, preprocessing, head, ``cut`` (unfreeze, unpooled, activations_shape), the base weights' digest, when."""
    from datetime import datetime, timezone

    from vfm import __version__

    return {"name": out.name, "base": part.base.name, "task": "classify", "labels": list(head.labels),
            "preprocess": part.runner.spec.preprocess.to_json(), "feature_dim": feature_dim, "head": head.config(),
            **cut, "base_weights_sha256": part.base.key()["weights_sha256"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vfm_version": __version__}


def unfreeze_run(cfg: TrainConfig) -> RunSummary:
    """Train ``cfg.unfreeze`` blocks of ``cfg.backbone`` with a head; write the model and report in ``cfg.out``."""
    from vfm.models.published import write_model

    assert cfg.unfreeze and cfg.settings is not None
    _check_out(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = open_dataset(cfg.data)
    if cfg.classes:
        data = data.select_classes(cfg.classes)
    splits = make_splits(data, cfg.split, cfg.seed, cfg.limit)
    part = FrozenPart(cfg.backbone, cfg.unfreeze, cfg.features.device, unpooled=cfg.unpooled)
    union = splits.union()
    feats = extract_features(data.source.subset(union), part, cfg.features.cache_folder(),
                             cfg.features.extract_batch_size, cfg.features.progress)
    position = {int(i): p for p, i in enumerate(union)}
    kept = {name: idx[feats.valid[[position[int(i)] for i in idx]]] for name, idx in splits.items()}
    splits = Splits(kept["train"], kept["val"], kept["test"])
    check_training_classes(data, splits.train)
    for name, idx in splits.items():
        if not len(idx):
            raise DataError(f"{data.spec}: every image of the {name} split was unreadable.")
    acts = {name: torch.from_numpy(feats.features[[position[int(i)] for i in idx]]) for name, idx in splits.items()}
    y = {name: torch.from_numpy(data.labels[idx]) for name, idx in splits.items()}
    classes = data.classes
    views, view_stats = None, []
    for view in range(1, cfg.views + 1):  # each view: one more pass of the training images through the frozen part
        got = extract_features(data.source.subset(splits.train), ViewPart(part, view), cfg.features.cache_folder(),
                               cfg.features.extract_batch_size, cfg.features.progress)
        view_stats.append(got.stats)
        views = torch.empty(cfg.views, *got.features.shape) if views is None else views
        views[view - 1] = torch.from_numpy(got.features)
    trainer = _Trainer(cfg, part, acts, y, data.source.subset(splits.train), classes, views)
    runs, states = [], []
    for lr in cfg.settings.lrs:
        hr, blocks, head = trainer.run(lr, cfg.features.progress)
        runs.append(hr)
        states.append((blocks, head))
    if all(r.best_epoch < 0 for r in runs):
        raise RuntimeError("every run diverged (its loss became infinite); use smaller --lr / --backbone-lr values.")
    summaries = []
    for hr, (blocks, head) in zip(runs, states):
        part.trainable.load_state_dict(blocks)
        # a rate too high can also leave the loss finite and the model flat: one class for every validation image
        if hr.best_epoch >= 0 and len(classes) > 1 and len(np.unique(trainer.evaluate(head, "val")[2])) == 1:
            hr.stopped = "collapsed"
        summaries.append(HeadSummary(hr.name, f"lr {hr.lr:g}", hr.best_epoch, hr.best_val_accuracy,
                                     hr.best_val_loss if math.isfinite(hr.best_val_loss) else None,
                                     trainer.evaluate(head, "test")[1], hr.stopped, hr.history))
    usable = [i for i, r in enumerate(runs) if r.best_epoch >= 0 and r.stopped != "collapsed"]
    if not usable:
        raise RuntimeError("every run collapsed (its best state answers one class for every validation image) or "
                           "diverged; use smaller --lr / --backbone-lr values.")
    chosen = usable[choose_best([runs[i] for i in usable])]
    blocks, head = states[chosen]
    part.trainable.load_state_dict(blocks)
    _, _, pred = trainer.evaluate(head, "test")
    ev = evaluate(y["test"].numpy(), pred, classes, cfg.delta)
    fingerprint = data_fingerprint(data, splits)
    counts = splits.counts()

    part.module.head = head.cpu()  # the base network, its last blocks trained, with the new head
    s = cfg.settings
    backbone_lr = cfg.backbone_lr or runs[chosen].lr / 10
    training = {"chosen": summaries[chosen].name, "selected_on": "validation accuracy", "unfreeze": cfg.unfreeze,
                "blocks": part.chain.count, "block_kind": describe_blocks(cfg.backbone), "lr": runs[chosen].lr,
                "backbone_lr": backbone_lr, "augment": cfg.augment, "best_epoch": runs[chosen].best_epoch,
                "views": [describe_view(v) for v in range(1, cfg.views + 1)], "label_smoothing": cfg.label_smoothing,
                "head_epochs": cfg.head_epochs, "mixup": cfg.mixup,
                "batch_norm": "frozen statistics" if cfg.batch_norm == "frozen" else "batch statistics in training",
                **s.to_json()}
    metrics = {"val_accuracy": summaries[chosen].val_accuracy, "test_accuracy": ev.accuracy, "test_error": ev.error,
               "test_k": ev.k, "delta": ev.delta, "test_error_bound": ev.bound, "bound": ev.bound_sentence()}
    cut = {} if cfg.unpooled is None else {"unpooled": cfg.unpooled, "activations_shape": list(part.out_shape)}
    meta = {**model_identity(cfg.out, part, head, trainer.feature_dim, unfreeze=cfg.unfreeze, **cut),
            "training": training, "metrics": metrics,
            "data": {"spec": cfg.data, "fingerprint": fingerprint, "counts": counts, "split": list(cfg.split),
                     "limit": cfg.limit, "classes": list(cfg.classes) if cfg.classes else None,
                     "skipped_unreadable": feats.stats.skipped}}
    write_model(cfg.out, part.module.state_dict(), to_jsonable(meta))
    run_json = {"config": {"backbone": cfg.backbone, "data": cfg.data, "unfreeze": cfg.unfreeze, "unpooled": cfg.unpooled,
                           "backbone_lr": cfg.backbone_lr, "augment": cfg.augment, "views": cfg.views,
                           "label_smoothing": cfg.label_smoothing, "batch_norm": cfg.batch_norm, "head_epochs": cfg.head_epochs,
                           "mixup": cfg.mixup, "split": list(cfg.split),
                           "seed": cfg.seed, "limit": cfg.limit, "training": s.to_json()},
                "counts": counts, "extraction": feats.stats.to_json(),
                "view_extraction": [v.to_json() for v in view_stats],
                "heads": [{"name": x.name, "setting": x.setting, "best_epoch": x.best_epoch,
                           "val_accuracy": x.val_accuracy, "val_loss": x.val_loss, "test_accuracy": x.test_accuracy,
                           "stopped": x.stopped, "history": x.history} for x in summaries],
                "chosen": summaries[chosen].name, "test": ev.to_json(), "data_fingerprint": fingerprint,
                "seconds": time.perf_counter() - t0}
    atomic_write_bytes(cfg.out / "run.json", (json.dumps(to_jsonable(run_json), indent=2) + "\n").encode())
    st = feats.stats
    kind, count = describe_blocks(cfg.backbone), part.chain.count
    if cfg.unpooled:
        what = (f"cut before its last {cfg.unpooled} of {count} {kind}, the {cfg.unfreeze} before the cut trained with a "
                f"{s.head} head on their output unpooled ({'x'.join(map(str, part.out_shape))})")
    else:
        what = (f"last {cfg.unfreeze} of {count} {kind} trained with a {s.head} head" + (
            "" if cfg.unpooled is None else f" on their output unpooled ({'x'.join(map(str, part.out_shape))})"))
    facts = [("model", f"`{cfg.backbone}`, {what} (model.json + model.safetensors)"),
             ("data", f"`{cfg.data}` ({len(classes)} classes; data fingerprint `{fingerprint[:16]}`)"),
             ("examples", f"train {counts['train']}, val {counts['val']}, test {counts['test']}"),
             ("frozen activations", f"{st.total} images, {st.cached} from cache, {st.computed} computed; shape "
                                    f"{'x'.join(map(str, part.shape))}"),
             ("training", f"sgd, batch {s.batch_size}, momentum {s.momentum:g}, {s.schedule} schedule, {s.epochs} "
                          f"epochs, patience {s.patience or 'off'}, weight decay {s.weight_decay[0]:g}, head lr "
                          f"{', '.join(f'{lr:g}' for lr in s.lrs)}, blocks' lr {cfg.backbone_lr or 'head lr / 10'}"
                          + (", augmented (flips, shifts)" if cfg.augment else "")
                          + (f", {cfg.views} cached augmented views" if cfg.views else "")
                          + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
                          + (f", the head alone {cfg.head_epochs} epochs first" if cfg.head_epochs else "")
                          + (f", mixup of the blocks' inputs, Beta({cfg.mixup:g}, {cfg.mixup:g})" if cfg.mixup else "")),
             ("chosen", f"`{summaries[chosen].name}`"), ("seed", str(cfg.seed))]
    notes = ["The blocks train in eval mode: batch-norm statistics stay the pre-trained ones." if cfg.batch_norm ==
             "frozen" else "The blocks' batch norm trains on batch statistics (and updates the running ones).",
             f"Publish: `vfm finetune publish {cfg.out} --name NAME`; then `vfm predict NAME IMAGE`."]
    flags = f"--unfreeze {cfg.unfreeze}" + ("" if cfg.unpooled is None else f" --unpooled {cfg.unpooled}")
    write_report(cfg.out, RunReport(f"Fine-tuning run {cfg.out.name} ({flags})", facts, summaries,
                                    chosen, ev, notes))
    return RunSummary(cfg.out, summaries[chosen].name, ev, summaries, feats.stats, counts, None)


def model_part(folder: Path, device: str = "auto") -> tuple[FrozenPart, torch.nn.Module, dict[str, Any]]:
    """The model in ``folder`` (an ``--unfreeze`` / ``--unpooled`` run, or a published model) as (a FrozenPart with
    its trained blocks loaded, its head, model.json): ``head(part.trainable(acts))`` is the model's logits on the
    part's activations, which are cached and shared with the training runs of the same base and cut."""
    from vfm.models.checkpoints import load_into
    from vfm.models.errors import WeightsUnavailable
    from vfm.models.published import TENSORS_NAME, InvalidModel, blocks_entry, head_module, read_meta

    meta = read_meta(folder)
    unfreeze, unpooled = blocks_entry(meta, "unfreeze"), blocks_entry(meta, "unpooled")
    if unpooled is None and not unfreeze:
        raise InvalidModel(f"{folder / 'model.json'} says neither which blocks were trained (unfreeze) nor where the "
                           "body is cut (unpooled).")
    part = FrozenPart(meta["base"], unfreeze or 0, device, unpooled=unpooled)
    digest = meta.get("base_weights_sha256")
    if digest and part.base.key()["weights_sha256"] != digest:  # the frozen part computes with this machine's weights
        raise BackboneError(f"the model in {folder} was trained on {meta['base']} weights {digest[:12]}... but this "
                            f"machine's are {part.base.key()['weights_sha256'][:12]}...; its scores would mean nothing.")
    head = head_module(meta)
    part.module.head = head
    try:
        load_into(part.module, folder / TENSORS_NAME, folder.name)
    except WeightsUnavailable as exc:
        raise InvalidModel(str(exc)) from None
    part.trainable.eval()
    head.eval().to(part.device)
    return part, head, meta


def model_logits(part: FrozenPart, head: torch.nn.Module, acts: np.ndarray | torch.Tensor) -> np.ndarray:
    """The model's logits on ``acts`` (the part's flattened activations)."""
    head.eval()
    device = next(head.parameters()).device
    with torch.no_grad():
        return head(part_outputs(part, acts).to(device)).float().cpu().numpy()


def cmd_publish_model(args: argparse.Namespace) -> int:
    """`vfm finetune publish RUN [--to MODELS_DIR] [--name NAME]` for a run that holds a model."""
    from vfm.models.published import InvalidModel, models_dirs, publish_model

    try:
        dest = publish_model(Path(args.run).expanduser(), args.name, args.to, args.overwrite, REPORT_FILES)
    except (InvalidModel, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    print(f"published {args.run} as model {dest.name} in {dest.parent}")
    if dest.parent.resolve() not in [d.resolve() for d in models_dirs()]:
        print(f"vfm looks for models in {', '.join(map(str, models_dirs()))}: set VFM_MODELS_DIR={dest.parent} "
              f"(or models_dir: {dest.parent} in the service config) to use it")
    return 0

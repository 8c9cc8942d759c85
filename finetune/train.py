"""Training loops for linear and MLP heads on cached features: ``sgd`` and full-batch ``gd``.

Every learning rate of ``lrs`` trains its own head in the same pass (``StackedHeads``); the
settings are ``config.TrainSettings``, which checks them.

sgd: mini-batches, momentum (optionally Nesterov), weight decay, a cosine, step or constant
schedule, and early stopping on validation; each head keeps its best epoch on validation.
gd: full batch; from each head's learning rate the step is halved until the objective
(mean loss + weight_decay/2 * |params|^2) falls, so it never rises; a head stops when its
gradient norm is under ``tol``.

Seeded and deterministic on CPU (same threads, same result); a checkpoint is written
atomically after each epoch and ``resume=True`` continues from it to the same result.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint import generator_state, load_checkpoint, restore_generator, save_checkpoint
from .config import TrainSettings
from .stacked import StackedHeads, batch_losses

log = logging.getLogger(__name__)

_EVAL_CHUNK = 8192
_MAX_HALVINGS = 60


@dataclass
class HeadRun:
    name: str
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    stopped: str = ""                    # patience | converged | no-decrease | diverged | "" (ran all epochs)
    initial_loss: float | None = None    # gd: the objective before the first step

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["best_val_loss"] = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        return out


@dataclass
class TrainResult:
    model: StackedHeads                  # every head at its chosen weights
    runs: list[HeadRun]
    best: int                            # index of the head chosen on validation
    mean: torch.Tensor
    std: torch.Tensor
    resumed_from: int | None = None      # epoch of the checkpoint a resumed run started after


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)  # constant features (blank borders)


def choose_best(runs: list[HeadRun]) -> int:
    """Highest validation accuracy; ties to the lower validation loss, then to the first listed."""
    return max(range(len(runs)), key=lambda i: (runs[i].best_val_accuracy, -runs[i].best_val_loss, -i))


def train_heads(settings: TrainSettings, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, num_classes: int, run_dir: Path | None = None, resume: bool = False,
                run_digest: str = "", progress: bool = False) -> TrainResult:
    """Train one head per learning rate; ``run_dir`` gets a checkpoint after every epoch."""
    torch.manual_seed(settings.seed)
    mean, std = standardisation(x_train)
    xs, xv = (x_train - mean) / std, (x_val - mean) / std
    model = StackedHeads(len(settings.lrs), x_train.shape[1], num_classes, settings.hidden, settings.dropout,
                         settings.loss, seed=settings.seed)
    runs = [HeadRun(settings.head_name(lr), lr) for lr in settings.lrs]
    loop = _SGD(settings, model, runs) if settings.optimizer == "sgd" else _GD(settings, model, runs)
    start = 0
    if resume and run_dir is not None:
        ckpt = load_checkpoint(run_dir, run_digest)
        if ckpt is not None:
            start = loop.restore(ckpt.tensors, ckpt.state)
            log.info("resuming after epoch %d", start)
    resumed_from = start if resume and start > 0 else None
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.epochs, initial=start, unit="epoch", disable=not progress,
               desc=f"train {settings.head} x{len(settings.lrs)} lr")
    with _threads(_threads_for(settings, model, len(x_train))):
        for epoch in range(start, settings.epochs):
            if not loop.active.any():
                break
            loop.epoch(epoch, xs, y_train, xv, y_val)
            if run_dir is not None:
                tensors, state = loop.snapshot()
                state.update(run_digest=run_digest, epoch=epoch + 1)
                save_checkpoint(run_dir, tensors, state)
            bar.update(1)
            bar.set_postfix(best_val_acc=f"{max(r.best_val_accuracy for r in runs):.4f}")
    bar.close()
    loop.finish()
    return TrainResult(model, runs, choose_best(runs), mean, std, resumed_from)


def _threads_for(settings: TrainSettings, model: StackedHeads, n: int) -> int:
    """One thread unless a step is big (about 2 GFLOP): for smaller steps, waking a thread pool
    costs about what it saves, and on a busy machine many times more. The count follows from the
    problem, not the machine's load, so runs stay repeatable; ``threads`` overrides it."""
    if settings.threads:
        return settings.threads
    rows = n if settings.optimizer == "gd" else settings.batch_size
    flops = 6 * rows * model.num_heads * sum(w.shape[1] * w.shape[2] for w in model.weights)
    return 1 if flops < 2e9 else torch.get_num_threads()


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_stacked(model: StackedHeads, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss [H] and accuracy [H] on (x, y), no dropout, in chunks."""
    loss = torch.zeros(model.num_heads, dtype=torch.float64)
    correct = torch.zeros(model.num_heads, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), _EVAL_CHUNK):
            out = model(x[i:i + _EVAL_CHUNK])
            yb = y[i:i + _EVAL_CHUNK]
            loss += batch_losses(out, yb, model.loss, model.num_classes).double().sum(dim=1)
            correct += (model.predictions(out) == yb).double().sum(dim=1)
    n = max(len(x), 1)
    return loss / n, correct / n


def _per_head(lr: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return lr.view(-1, *([1] * (like.ndim - 1)))


class _Loop:
    def __init__(self, settings: TrainSettings, model: StackedHeads, runs: list[HeadRun]):
        self.s, self.model, self.runs = settings, model, runs
        self.params = list(model.weights) + list(model.biases)
        self.lrs = torch.tensor(settings.lrs, dtype=torch.float32)
        self.active = torch.ones(len(runs), dtype=torch.bool)

    def _state(self) -> dict[str, Any]:
        return {"runs": [r.to_json() for r in self.runs], "active": self.active.tolist()}

    def _restore_state(self, state: dict[str, Any]) -> None:
        for run, saved in zip(self.runs, state["runs"]):
            run.history, run.best_epoch, run.stopped = saved["history"], saved["best_epoch"], saved["stopped"]
            run.best_val_accuracy = saved["best_val_accuracy"]
            run.best_val_loss = math.inf if saved["best_val_loss"] is None else saved["best_val_loss"]
            run.initial_loss = saved.get("initial_loss")
        self.active = torch.tensor(state["active"], dtype=torch.bool)

    def _record(self, h: int, epoch: int, lr: float, train_loss: float, train_acc: float, val_loss: float,
                val_acc: float, **extra: float) -> None:
        self.runs[h].history.append({"epoch": epoch + 1, "lr": lr, "train_loss": train_loss,
                                     "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                                     **extra})


class _SGD(_Loop):
    def __init__(self, settings: TrainSettings, model: StackedHeads, runs: list[HeadRun]):
        super().__init__(settings, model, runs)
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.best = [p.detach().clone() for p in self.params]
        self.bad_epochs = [0] * len(runs)
        self.shuffle = torch.Generator().manual_seed(settings.seed + 1)
        self.drop = torch.Generator().manual_seed(settings.seed + 2)

    def factor(self, epoch: int, step: int, steps: int) -> float:
        if self.s.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (self.s.epochs * steps)))
        if self.s.schedule == "step":
            every = self.s.step_epochs or max(1, self.s.epochs // 3)
            return 0.1 ** (epoch // every)
        return 1.0

    def epoch(self, epoch: int, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        n, bs = len(x), self.s.batch_size
        steps = math.ceil(n / bs)
        perm = torch.randperm(n, generator=self.shuffle)
        loss_sum = torch.zeros(len(self.runs), dtype=torch.float64)
        correct = torch.zeros(len(self.runs), dtype=torch.float64)
        for step in range(steps):
            idx = perm[step * bs:(step + 1) * bs]
            xb, yb = x[idx], y[idx]
            out = self.model(xb, dropout_gen=self.drop)
            per_head = self.model.losses(out, yb)
            grads = torch.autograd.grad(per_head.sum(), self.params)
            lr = self.lrs * self.factor(epoch, step, steps) * self.active
            self._step(grads, lr)
            loss_sum += per_head.detach().double() * len(idx)
            correct += (self.model.predictions(out.detach()) == yb).double().sum(dim=1)
        val_loss, val_acc = evaluate_stacked(self.model, xv, yv)
        lr_now = self.factor(epoch, steps - 1, steps)
        for h, run in enumerate(self.runs):
            if not self.active[h]:
                continue
            train_loss = float(loss_sum[h] / n)
            self._record(h, epoch, float(self.lrs[h]) * lr_now, train_loss, float(correct[h] / n),
                         float(val_loss[h]), float(val_acc[h]))
            if not math.isfinite(train_loss) or not math.isfinite(float(val_loss[h])):
                run.stopped, self.active[h] = "diverged", False
                continue
            if (float(val_acc[h]), -float(val_loss[h])) > (run.best_val_accuracy, -run.best_val_loss):
                run.best_epoch = epoch + 1
                run.best_val_accuracy, run.best_val_loss = float(val_acc[h]), float(val_loss[h])
                for b, p in zip(self.best, self.params):
                    b[h] = p.detach()[h]
                self.bad_epochs[h] = 0
            else:
                self.bad_epochs[h] += 1
                if self.s.patience and self.bad_epochs[h] >= self.s.patience:
                    run.stopped, self.active[h] = "patience", False

    def _step(self, grads: tuple[torch.Tensor, ...], lr: torch.Tensor) -> None:
        # torch.optim.SGD's update, with one learning rate per head (dampening 0).
        m, wd = self.s.momentum, self.s.weight_decay
        with torch.no_grad():
            for p, g, buf in zip(self.params, grads, self.bufs):
                d = g + wd * p if wd else g
                if m:
                    buf.mul_(m).add_(d)
                    d = d + m * buf if self.s.nesterov else buf
                p.sub_(_per_head(lr, p) * d)

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        tensors.update({f"buf.{i}": b for i, b in enumerate(self.bufs)})
        tensors.update({f"best.{i}": b for i, b in enumerate(self.best)})
        tensors.update({"rng.shuffle": generator_state(self.shuffle), "rng.dropout": generator_state(self.drop)})
        return tensors, {**self._state(), "bad_epochs": self.bad_epochs}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> int:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
                self.bufs[i].copy_(tensors[f"buf.{i}"])
                self.best[i].copy_(tensors[f"best.{i}"])
        restore_generator(self.shuffle, tensors["rng.shuffle"])
        restore_generator(self.drop, tensors["rng.dropout"])
        self._restore_state(state)
        self.bad_epochs = list(state["bad_epochs"])
        return int(state["epoch"])

    def finish(self) -> None:
        with torch.no_grad():  # each head ends at its best epoch on validation
            for p, b in zip(self.params, self.best):
                p.copy_(b)


class _GD(_Loop):
    def __init__(self, settings: TrainSettings, model: StackedHeads, runs: list[HeadRun]):
        super().__init__(settings, model, runs)
        self.eta = self.lrs.clone().double()

    def objective(self, x: torch.Tensor, y: torch.Tensor, grad: bool) -> torch.Tensor:
        """[H] mean loss + wd/2 |params|^2; with ``grad`` also fills p.grad (chunked, exact sum)."""
        total = torch.zeros(self.model.num_heads, dtype=torch.float64)
        for p in self.params:
            p.grad = None
        with torch.set_grad_enabled(grad):
            for i in range(0, len(x), _EVAL_CHUNK):
                out = self.model(x[i:i + _EVAL_CHUNK])
                part = batch_losses(out, y[i:i + _EVAL_CHUNK], self.model.loss, self.model.num_classes).sum(dim=1)
                part = part / len(x)
                if grad:
                    part.sum().backward()
                total += part.detach().double()
            reg = 0.5 * self.s.weight_decay * self.model.penalty() if self.s.weight_decay else None
            if reg is not None:
                if grad:
                    reg.sum().backward()
                total += reg.detach().double()
        return total

    def epoch(self, epoch: int, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        current = self.objective(x, y, grad=True)
        for h, run in enumerate(self.runs):
            if run.initial_loss is None:
                run.initial_loss = float(current[h])
        was_active = self.active.clone()
        grads = [p.grad.detach().clone() for p in self.params]
        norms = torch.sqrt(sum(g.double().pow(2).reshape(len(self.runs), -1).sum(dim=1) for g in grads))
        todo = self.active & (norms >= self.s.tol)
        for h in torch.nonzero(self.active & ~todo).flatten().tolist():
            self.runs[h].stopped, self.active[h] = "converged", False
        start = [p.detach().clone() for p in self.params]
        accepted = ~todo
        new = current.clone()
        for _ in range(_MAX_HALVINGS):
            if accepted.all():
                break
            pending = ~accepted
            with torch.no_grad():  # only pending heads move; accepted ones keep their new point
                for p, p0, g in zip(self.params, start, grads):
                    trial = p0 - _per_head(self.eta.float(), p) * g
                    p.copy_(torch.where(_per_head(pending, p), trial, p))
            value = self.objective(x, y, grad=False)
            falls = pending & (value < current)
            new = torch.where(falls, value, new)
            accepted |= falls
            with torch.no_grad():  # heads whose loss did not fall go back to where they were
                for p, p0 in zip(self.params, start):
                    p.copy_(torch.where(_per_head(~accepted, p), p0, p))
            self.eta = torch.where(~accepted, self.eta / 2, self.eta)
        for h in torch.nonzero(todo & ~accepted).flatten().tolist():
            self.runs[h].stopped, self.active[h] = "no-decrease", False  # flat to float precision
        _, train_acc = evaluate_stacked(self.model, x, y)
        val_loss, val_acc = evaluate_stacked(self.model, xv, yv)
        for h in torch.nonzero(was_active).flatten().tolist():
            run = self.runs[h]
            if todo[h] and accepted[h]:
                self._record(h, epoch, float(self.eta[h]), float(new[h]), float(train_acc[h]),
                             float(val_loss[h]), float(val_acc[h]), grad_norm=float(norms[h]))
            elif run.best_epoch >= 0:
                continue  # stopped now, after earlier steps: its last scores stand
            # gd keeps the last iterate, so the latest scores are the head's scores.
            run.best_epoch = epoch + 1 if todo[h] and accepted[h] else epoch
            run.best_val_accuracy, run.best_val_loss = float(val_acc[h]), float(val_loss[h])

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        tensors["gd.eta"] = self.eta
        return tensors, self._state()

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> int:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
        self.eta = tensors["gd.eta"].double().clone()
        self._restore_state(state)
        return int(state["epoch"])

    def finish(self) -> None:
        """gd keeps its last iterate: the objective only fell to get there."""

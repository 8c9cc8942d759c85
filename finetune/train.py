"""Training loops for linear and MLP heads on cached features: ``sgd``, full-batch ``gd`` and ``lbfgs``.

Every (learning rate, weight decay) pair of ``lrs`` x ``weight_decay`` trains its own head in the
same pass (``StackedHeads``); the settings are ``config.TrainSettings``, which checks them.

sgd: mini-batches, momentum (optionally Nesterov), weight decay, a cosine, step or constant
schedule, and early stopping on validation; each head keeps its best epoch on validation.
gd: full batch; from each head's learning rate the step is halved until the objective
(mean loss + weight_decay/2 * |params|^2) falls, so it never rises; a head stops when its
gradient norm is under ``tol``.
lbfgs: full batch, torch.optim.LBFGS with a strong-Wolfe line search on the same objective
(a linear softmax head: its gradient in closed form, no autograd, starting from zero, history 10),
one weight decay after the other from the strongest to the weakest, each fit starting where
the previous one ended (warm starts along the regularisation path, as glmnet and scikit-learn's
LogisticRegressionCV walk theirs); a fit stops when its largest gradient entry is under ``tol``
or after ``epochs`` iterations. A linear head keeps the minimiser of its objective; an MLP keeps
its best check on validation (every ``_LBFGS_CHECK`` iterations: early stopping).

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
_LBFGS_CHECK = 10    # lbfgs: iterations between two looks at validation


@dataclass
class HeadRun:
    name: str
    lr: float
    weight_decay: float = 0.0
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
    # two plain passes: torch's std/var_mean over dim 0 (a Welford reduction) took 7 ms on 760 x 1280
    # features on one thread, about a fifth of a whole linear fit; this takes 0.3 ms
    std = (x - mean).pow_(2).mean(dim=0).sqrt_()
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)  # constant features (blank borders)


def choose_best(runs: list[HeadRun]) -> int:
    """Highest validation accuracy; ties to the lower validation loss, then to the first listed."""
    return max(range(len(runs)), key=lambda i: (runs[i].best_val_accuracy, -runs[i].best_val_loss, -i))


def train_heads(settings: TrainSettings, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, num_classes: int, run_dir: Path | None = None, resume: bool = False,
                run_digest: str = "", progress: bool = False) -> TrainResult:
    """Train one head per (learning rate, weight decay); ``run_dir`` gets a checkpoint after every
    epoch (lbfgs: after every weight decay)."""
    # the CPU generator only: torch.manual_seed also queues a CUDA seeding, recording a stack trace each call
    # (about 10-30 ms, most of a linear fit) when CUDA is not initialised; every draw here is on the CPU
    torch.random.default_generator.manual_seed(settings.seed)
    settings.resolve(len(x_train))
    mean, std = standardisation(x_train)
    xs, xv = (x_train - mean) / std, (x_val - mean) / std
    grid = settings.grid()
    model = StackedHeads(len(grid), x_train.shape[1], num_classes, settings.hidden, settings.dropout,
                         settings.loss, seed=settings.seed)
    runs = [HeadRun(settings.head_name(lr, wd), lr, wd) for lr, wd in grid]
    loop = {"sgd": _SGD, "gd": _GD, "lbfgs": _LBFGS}[settings.optimizer](settings, model, runs)
    start = 0
    if resume and run_dir is not None:
        ckpt = load_checkpoint(run_dir, run_digest)
        if ckpt is not None:
            start = loop.restore(ckpt.tensors, ckpt.state)
            log.info("resuming after epoch %d", start)
    resumed_from = start if resume and start > 0 else None
    from tqdm.auto import tqdm

    bar = tqdm(total=loop.steps, initial=start, unit=loop.unit, disable=not progress,
               desc=f"train {settings.head} x{len(grid)} heads")
    with _threads(_threads_for(settings, model, len(x_train))):
        for epoch in range(start, loop.steps):
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
    rows = settings.batch_size if settings.optimizer == "sgd" else n
    heads = 1 if settings.optimizer == "lbfgs" else model.num_heads  # lbfgs fits one head at a time
    flops = 6 * rows * heads * sum(w.shape[1] * w.shape[2] for w in model.weights)
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
    unit = "epoch"

    def __init__(self, settings: TrainSettings, model: StackedHeads, runs: list[HeadRun]):
        self.s, self.model, self.runs = settings, model, runs
        self.params = list(model.weights) + list(model.biases)
        self.lrs = torch.tensor([r.lr for r in runs], dtype=torch.float32)
        self.wds = torch.tensor([r.weight_decay for r in runs], dtype=torch.float32)
        self.active = torch.ones(len(runs), dtype=torch.bool)
        self.steps = settings.epochs

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
        # Only the heads still training run: a head stopped early (patience, diverged) costs nothing
        # more. Their parameters and momentum are gathered for the epoch and put back after it.
        live = torch.nonzero(self.active).flatten()
        every = len(live) == len(self.runs)
        params = self.params if every else [p.detach()[live].requires_grad_(True) for p in self.params]
        bufs = self.bufs if every else [b[live] for b in self.bufs]
        lrs, wds = self.lrs[live], self.wds[live]
        for step in range(steps):
            idx = perm[step * bs:(step + 1) * bs]
            xb, yb = x[idx], y[idx]
            out = self.model(xb, dropout_gen=self.drop, params=None if every else params)
            per_head = self.model.losses(out, yb)
            grads = torch.autograd.grad(per_head.sum(), params)
            self._step(params, bufs, grads, lrs * self.factor(epoch, step, steps), wds)
            loss_sum[live] += per_head.detach().double() * len(idx)
            correct[live] += (self.model.predictions(out.detach()) == yb).double().sum(dim=1)
        if not every:
            with torch.no_grad():
                for p, q, b, c in zip(self.params, params, self.bufs, bufs):
                    p[live] = q
                    b[live] = c
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

    def _step(self, params: list[torch.Tensor], bufs: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
              lr: torch.Tensor, wds: torch.Tensor) -> None:
        # torch.optim.SGD's update, with one learning rate per head (dampening 0), in place.
        m, decay = self.s.momentum, bool(wds.any())
        with torch.no_grad():
            for p, g, buf in zip(params, grads, bufs):
                d = g + _per_head(wds, p) * p if decay else g
                if m:
                    buf.mul_(m).add_(d)
                    d = d + m * buf if self.s.nesterov else buf
                p.addcmul_(_per_head(lr, p), d, value=-1)

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
            reg = 0.5 * self.wds * self.model.penalty() if self.wds.any() else None
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


class _LBFGS(_Loop):
    """One head per step of the outer loop: the weight decays from the strongest to the weakest,
    each fit warm-started from the previous one."""

    unit = "weight decay"

    def __init__(self, settings: TrainSettings, model: StackedHeads, runs: list[HeadRun]):
        super().__init__(settings, model, runs)
        self.order = sorted(range(len(runs)), key=lambda h: (-float(self.wds[h]), h))
        self.steps = len(runs)
        self.keep_best = bool(model.hidden)  # an MLP stops early on validation; a linear head is convex
        # a linear head runs to its minimiser in one step (no looks at validation on the way: they cost
        # evaluations and change nothing); an MLP looks every _LBFGS_CHECK iterations
        self.check = _LBFGS_CHECK if self.keep_best else settings.epochs
        self.closed_form = not model.hidden and model.loss == "ce"
        self.softmax: _SoftmaxLinear | None = None

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One head's outputs [1, B, O] from its own (unstacked) weights then biases."""
        k = len(self.model.weights)
        h = x
        for i, (w, b) in enumerate(zip(params[:k], params[k:])):
            h = h @ w + b
            if i < k - 1:
                h = torch.relu(h)
        return h[None]

    def _scores(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            out = self._forward(params, x)
            loss = batch_losses(out, y, self.model.loss, self.model.num_classes).mean()
            acc = (self.model.predictions(out)[0] == y).double().mean()
        return float(loss), float(acc)

    def epoch(self, step: int, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
        h = self.order[step]
        run, wd = self.runs[h], float(self.wds[h])
        with torch.no_grad():
            for p in self.params:
                if step:  # warm start: the previous (stronger) weight decay's solution
                    p[h] = p[self.order[step - 1]]
                elif self.closed_form:  # a convex fit starts at zero, as scikit-learn's and glmnet's paths do
                    p[h] = 0.0
        if self.closed_form:
            # the linear softmax head's gradient in closed form: no autograd graph per evaluation.
            # Its weight is held [outputs, features], so both matmuls run on contiguous operands.
            if self.softmax is None or self.softmax.x is not x:
                self.softmax = _SoftmaxLinear(x, y, self.model.num_classes)
            params = [self.model.weights[0].detach()[h].T.contiguous(), self.model.biases[0].detach()[h].clone()]
            fn = self.softmax

            def objective() -> torch.Tensor:
                return fn(params[0], params[1], wd, grad=False)[0]

            def evaluate() -> torch.Tensor:
                value, gw, gb = fn(params[0], params[1], wd)
                params[0].grad, params[1].grad = gw, gb
                return value
        else:
            params = [p.detach()[h].clone().requires_grad_(True) for p in self.params]

            def objective() -> torch.Tensor:
                out = self._forward(params, x)
                loss = batch_losses(out, y, self.model.loss, self.model.num_classes).mean()
                return loss + 0.5 * wd * sum(q.pow(2).sum() for q in params) if wd else loss

            def evaluate() -> torch.Tensor:
                opt.zero_grad()
                value = objective()
                value.backward()
                return value

        # history: scipy's L-BFGS-B default for the convex fit (as LogisticRegression's), more for an MLP
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=_LBFGS_CHECK, history_size=10 if self.closed_form else 20,
                                tolerance_grad=self.s.tol, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        with torch.no_grad():  # from zero, a softmax head's objective is log(classes): no evaluation needed
            run.initial_loss = (math.log(self.model.num_classes) if self.closed_form and not step
                                else float(objective()))
        best = [q.detach().clone() for q in self._unstacked(params)]
        done = 0
        while done < self.s.epochs:
            before = opt.state[params[0]].get("n_iter", 0)
            group = opt.param_groups[0]
            group["max_iter"] = min(self.check, self.s.epochs - done)
            group["max_eval"] = 25 * group["max_iter"]  # only the iterations or a tolerance end a step
            opt.step(evaluate)
            ran = opt.state[params[0]].get("n_iter", 0) - before
            done += ran
            found = self._unstacked(params)
            with torch.no_grad():
                if self.closed_form:  # one pass for both
                    train_obj, train_acc = self.softmax.value_and_accuracy(params[0], params[1], wd)
                else:
                    train_obj = float(objective())
            if not math.isfinite(train_obj):
                run.stopped = "diverged"
                break
            if not self.closed_form:
                _, train_acc = self._scores(found, x, y)
            val_loss, val_acc = self._scores(found, xv, yv)
            self._record(h, done - 1, 1.0, train_obj, train_acc, val_loss, val_acc, weight_decay=wd,
                         iterations=float(done))
            better = (val_acc, -val_loss) > (run.best_val_accuracy, -run.best_val_loss)
            if not self.keep_best or better:
                run.best_epoch, run.best_val_accuracy, run.best_val_loss = done, val_acc, val_loss
                best = [q.detach().clone() for q in found]
            if ran < group["max_iter"]:
                run.stopped = "converged"  # the line search or the gradient tolerance ended it
                break
        with torch.no_grad():
            for p, q in zip(self.params, best):
                p[h] = q
        self.active[h] = False

    def _unstacked(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The head's parameters as StackedHeads holds one head's (the closed form's weight is transposed)."""
        return [params[0].T, params[1]] if self.closed_form else params

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"param.{i}": p.detach() for i, p in enumerate(self.params)}, self._state()

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> int:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
        self._restore_state(state)
        return int(state["epoch"])

    def finish(self) -> None:
        """Each head already holds its chosen weights."""


class _SoftmaxLinear:
    """Mean softmax cross-entropy of a linear head on (x, y) plus wd/2 |params|^2, and its gradient in
    closed form: d loss / d logits = (softmax - one-hot) / N, so an evaluation is two matmuls and no
    autograd graph. The sums are taken in float64 (L-BFGS' line search compares values that close).
    The logits are computed as w @ x.T on a transposed copy of x: with ten-odd outputs, that product
    runs about 3x faster than x @ w.T on one thread (MKL's small-N path)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        self.x, self.y, self.n = x, y.view(-1, 1), max(len(x), 1)
        self.xt = x.T.contiguous()
        self.num_classes = num_classes

    def value_and_accuracy(self, w: torch.Tensor, b: torch.Tensor, wd: float) -> tuple[float, float]:
        """The objective and the training accuracy, from one product."""
        z = (w @ self.xt).T + b
        value = (torch.logsumexp(z, dim=1).double().sum() - z.gather(1, self.y).double().sum()) / self.n
        if wd:
            value = value + 0.5 * wd * (w.double().pow(2).sum() + b.double().pow(2).sum())
        return float(value), float((z.argmax(dim=1) == self.y[:, 0]).double().mean())

    def __call__(self, w: torch.Tensor, b: torch.Tensor, wd: float, grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """w [outputs, features], b [outputs] -> (objective, d/dw, d/db); no gradients without ``grad``."""
        z = (w @ self.xt).T + b
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        value = (lse.double().sum() - z.gather(1, self.y).double().sum()) / self.n
        if wd:
            value = value + 0.5 * wd * (w.double().pow(2).sum() + b.double().pow(2).sum())
        if not grad:
            return value, None, None
        g = (z - lse).exp_()  # softmax
        g.scatter_add_(1, self.y, torch.full_like(self.y, -1, dtype=g.dtype))
        g.div_(self.n)
        gw, gb = g.T @ self.x, g.sum(dim=0)
        if wd:
            gw.add_(w, alpha=wd)
            gb.add_(b, alpha=wd)
        return value, gw, gb

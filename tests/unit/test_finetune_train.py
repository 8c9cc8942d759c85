"""finetune/train.py: sgd and gd on real features (sklearn's digits), one head per learning rate."""
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vfm.finetune.stacked import StackedHeads
from vfm.finetune.train import TrainSettings, evaluate_stacked, train_heads


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    return x[:1300], y[:1300], x[1300:], y[1300:]


def _weights(result):
    return [p.detach().clone() for p in result.model.parameters()]


def test_training_is_seeded_and_deterministic(digits):
    settings = TrainSettings(head="mlp", hidden=(32,), dropout=0.2, lrs=(0.03, 0.1), epochs=4, seed=3)
    a, b = train_heads(settings, *digits, 10), train_heads(settings, *digits, 10)
    assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b)))
    assert [r.history for r in a.runs] == [r.history for r in b.runs]
    other = TrainSettings(head="mlp", hidden=(32,), dropout=0.2, lrs=(0.03, 0.1), epochs=4, seed=4)
    c = train_heads(other, *digits, 10)
    assert not torch.equal(_weights(a)[0], _weights(c)[0])


def test_each_stacked_head_equals_a_run_with_its_learning_rate_alone(digits):
    many = train_heads(TrainSettings(head="mlp", hidden=(24,), dropout=0.1, lrs=(0.01, 0.1, 0.3), epochs=5,
                                     patience=2), *digits, 10)
    assert len(many.runs) == 3 and len({r.name for r in many.runs}) == 3
    for i, lr in enumerate((0.01, 0.1, 0.3)):
        one = train_heads(TrainSettings(head="mlp", hidden=(24,), dropout=0.1, lrs=(lr,), epochs=5, patience=2),
                          *digits, 10)
        alone, stacked = one.runs[0].history, many.runs[i].history
        assert [h["epoch"] for h in alone] == [h["epoch"] for h in stacked]  # same early stop
        for key in ("train_loss", "val_loss", "val_accuracy"):
            np.testing.assert_allclose([h[key] for h in alone], [h[key] for h in stacked], rtol=1e-4)
        for p_one, p_many in zip(one.model.parameters(), many.model.parameters()):
            torch.testing.assert_close(p_one[0], p_many[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_our_sgd_step_is_torch_sgd(digits, nesterov):
    x, y, xv, yv = digits
    settings = TrainSettings(lrs=(0.05,), epochs=3, batch_size=50, momentum=0.9, nesterov=nesterov,
                             weight_decay=1e-3, schedule="constant", patience=0, seed=5)
    ours = train_heads(settings, x, y, xv, yv, 10)
    # The same training with torch.optim.SGD on a plain nn.Linear, same init and batch order.
    ref = StackedHeads(1, 64, 10, seed=5)
    linear = torch.nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(ref.weights[0][0].T)
        linear.bias.copy_(ref.biases[0][0])
    mean, std = ours.mean, ours.std
    opt = torch.optim.SGD(linear.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    shuffle = torch.Generator().manual_seed(5 + 1)
    xs = (x - mean) / std
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: a thread pool only slows them down
    try:
        for _ in range(3):
            perm = torch.randperm(len(x), generator=shuffle)
            for i in range(0, len(x), 50):
                idx = perm[i:i + 50]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(linear(xs[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    # each head ends at its best epoch, so compare with the reference only if the last was the best
    assert ours.runs[0].best_epoch == 3
    torch.testing.assert_close(ours.model.weights[0][0].T, linear.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.model.biases[0][0], linear.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,loss,wd", [("linear", "ce", 0.0), ("mlp", "squared", 1e-3), ("mlp", "ce", 0.0)])
def test_gd_loss_never_increases(digits, head, loss, wd):
    settings = TrainSettings(head=head, hidden=(16,) if head == "mlp" else (), loss=loss, optimizer="gd",
                             lrs=(0.1, 10.0, 1000.0), epochs=25, weight_decay=wd)
    result = train_heads(settings, *digits, 10)
    for run in result.runs:
        losses = [run.initial_loss] + [h["train_loss"] for h in run.history]
        assert len(losses) > 5
        assert all(b < a for a, b in zip(losses, losses[1:])), run.name
    # lr 1000 would overshoot: its step was halved (many times) before the loss fell
    assert result.runs[2].history[0]["lr"] < 1000.0


def test_gd_stops_when_the_gradient_norm_is_under_tol(digits):
    x, y, xv, yv = digits
    # weight decay makes the problem strongly convex, so the gradient does go to zero
    settings = TrainSettings(optimizer="gd", lrs=(1.0,), epochs=500, weight_decay=0.05, tol=1e-3)
    result = train_heads(settings, x, y, xv, yv, 10)
    assert result.runs[0].stopped == "converged" and len(result.runs[0].history) < 500
    model = result.model
    model.zero_grad()
    xs = (x - result.mean) / result.std
    loss = model.losses(model(xs), y).sum() + 0.5 * 0.05 * model.penalty().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) < 1e-3


def test_early_stopping_keeps_the_best_validation_epoch(digits):
    x, y, xv, yv = digits
    result = train_heads(TrainSettings(head="mlp", hidden=(64,), lrs=(0.3,), epochs=40, patience=3), x, y, xv, yv, 10)
    run = result.runs[0]
    assert run.stopped == "patience" and len(run.history) == run.best_epoch + 3
    best = max(h["val_accuracy"] for h in run.history)
    assert run.best_val_accuracy == best
    _, acc = evaluate_stacked(result.model, (xv - result.mean) / result.std, yv)
    assert float(acc[0]) == pytest.approx(best)  # the weights are the best epoch's, not the last


def test_step_schedule_and_nesterov(digits):
    result = train_heads(TrainSettings(lrs=(0.1,), epochs=6, schedule="step", step_epochs=2, nesterov=True,
                                       patience=0), *digits, 10)
    lrs = [h["lr"] for h in result.runs[0].history]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert result.runs[0].best_val_accuracy > 0.9


@pytest.mark.parametrize("loss", ["hinge", "squared"])
def test_hinge_and_squared_losses_learn(digits, loss):
    x, y, xv, yv = digits
    if loss == "hinge":  # binary: 3 against 8, labels -1/+1 inside the loss
        keep, keep_v = (y == 3) | (y == 8), (yv == 3) | (yv == 8)
        x, y, xv, yv = x[keep], (y[keep] == 8).long(), xv[keep_v], (yv[keep_v] == 8).long()
    classes = 2 if loss == "hinge" else 10
    result = train_heads(TrainSettings(loss=loss, lrs=(0.01, 0.03), epochs=15), x, y, xv, yv, classes)
    assert result.runs[result.best].best_val_accuracy > (0.95 if loss == "hinge" else 0.9)
    assert result.model.weights[0].shape[-1] == (1 if loss == "hinge" else 10)


def test_heads_stopped_early_keep_their_best_while_the_others_train_on(digits):
    """A head stopped by patience drops out of the stacked pass (it costs nothing more); the heads
    still training go on as they would alone, and the stopped one keeps its best epoch's weights."""
    x, y, xv, yv = digits
    settings = TrainSettings(head="mlp", hidden=(32,), lrs=(0.01, 3.0), epochs=12, patience=2)
    result = train_heads(settings, x, y, xv, yv, 10)
    slow, fast = result.runs
    assert fast.stopped == "patience" and len(fast.history) < len(slow.history) == 12
    _, acc = evaluate_stacked(result.model, (xv - result.mean) / result.std, yv)
    assert float(acc[1]) == pytest.approx(fast.best_val_accuracy)
    alone = train_heads(TrainSettings(head="mlp", hidden=(32,), lrs=(0.01,), epochs=12, patience=2), x, y, xv, yv, 10)
    np.testing.assert_allclose([e["val_loss"] for e in alone.runs[0].history], [e["val_loss"] for e in slow.history],
                               rtol=1e-4)
    for p_one, p_many in zip(alone.model.parameters(), result.model.parameters()):
        torch.testing.assert_close(p_one[0], p_many[0], rtol=1e-4, atol=1e-5)

"""H heads of one shape, one per learning rate, trained side by side (DINOv2's linear eval).

Weights are stacked on a leading head axis, so one mini-batch of features goes through every
head in one batched matmul: the features are read once for all learning rates. Every head
starts from the same initial weights and sees the same dropout masks; only its learning rate
differs, so a head here equals the head a single-rate run would train.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfm.models.heads import LinearHead, MLPHead, num_outputs


class StackedHeads(nn.Module):
    def __init__(self, num_heads: int, feature_dim: int, num_classes: int, hidden: Sequence[int] = (),
                 dropout: float = 0.0, loss: str = "ce", seed: int = 0):
        super().__init__()
        self.num_heads, self.feature_dim, self.num_classes = num_heads, feature_dim, num_classes
        self.hidden, self.dropout, self.loss = tuple(hidden), float(dropout), loss
        widths = [feature_dim, *self.hidden, num_outputs(loss, num_classes)]
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default range
            w = (torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w.expand(num_heads, -1, -1).clone()))
            self.biases.append(nn.Parameter(b.expand(num_heads, -1).clone()))

    def forward(self, x: torch.Tensor, dropout_gen: torch.Generator | None = None,
                params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """[B, D] standardised features -> [H, B, outputs]. Dropout only when given a generator.
        ``params``: weights then biases of a subset of the heads, stacked as this module's (the heads
        still training); the dropout masks are the same whichever heads run."""
        h = x
        weights, biases = (self.weights, self.biases) if params is None else (params[:len(self.weights)],
                                                                               params[len(self.weights):])
        last = len(weights) - 1
        for i, (w, b) in enumerate(zip(weights, biases)):
            h = torch.matmul(h, w) + b[:, None, :]
            if i < last:
                h = torch.relu(h)
                if dropout_gen is not None and self.dropout > 0:
                    # One mask [B, width] shared by every head: the heads differ by learning rate only.
                    keep = torch.rand(h.shape[1:], generator=dropout_gen) >= self.dropout
                    h = h * keep / (1.0 - self.dropout)
        return h

    def losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of each head over the batch: [H]."""
        return batch_losses(out, y, self.loss, self.num_classes).mean(dim=1)

    def predictions(self, out: torch.Tensor) -> torch.Tensor:
        """[H, B] class indices."""
        if self.loss == "hinge":
            return (out[..., 0] > 0).long()
        return out.argmax(dim=-1)

    def penalty(self) -> torch.Tensor:
        """sum of squared parameters per head: [H] (weight decay's objective term, /2 by the caller)."""
        total = torch.zeros(self.num_heads)
        for p in list(self.weights) + list(self.biases):
            total = total + p.pow(2).reshape(self.num_heads, -1).sum(dim=1)
        return total

    def unstack(self, index: int, labels: Sequence[str], mean: torch.Tensor, std: torch.Tensor
                ) -> LinearHead | MLPHead:
        """Head ``index`` as the servable module of models.heads (same outputs, no stacking)."""
        if self.hidden:
            head: LinearHead | MLPHead = MLPHead(labels, self.feature_dim, self.hidden, self.dropout, self.loss)
            layers = head.linear_layers()
        else:
            head = LinearHead(labels, self.feature_dim, self.loss)
            layers = [head.net[0]]
        with torch.no_grad():
            head.feature_mean.copy_(mean)
            head.feature_std.copy_(std)
            for layer, w, b in zip(layers, self.weights, self.biases):
                layer.weight.copy_(w[index].T)
                layer.bias.copy_(b[index])
        return head.eval()


def batch_losses(out: torch.Tensor, y: torch.Tensor, loss: str, num_classes: int) -> torch.Tensor:
    """Per-example loss [H, B] for outputs [H, B, O] and class indices y [B].

    ce: softmax cross-entropy. hinge: max(0, 1 - t f) with t = +1 for class 1, -1 for class 0.
    squared: half the squared distance between the outputs and the one-hot target.
    """
    heads, batch = out.shape[:2]
    if loss == "ce":
        flat = F.cross_entropy(out.reshape(heads * batch, -1), y.repeat(heads), reduction="none")
        return flat.view(heads, batch)
    if loss == "hinge":
        sign = (2 * y - 1).to(out.dtype)
        return torch.relu(1 - sign * out[..., 0])
    if loss == "squared":
        target = F.one_hot(y, num_classes).to(out.dtype)
        return 0.5 * (out - target).pow(2).sum(dim=-1)
    raise ValueError(f"unknown loss {loss!r}")

"""What a person looks at after a run: report.md, curves.png and confusion.png."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfm.models.checkpoints import atomic_write_bytes

from .evaluate import Evaluation


@dataclass
class HeadSummary:
    """One row of the heads table (every learning rate, or every k, of the run)."""

    name: str
    setting: str                 # "lr 0.1", "lr 0.1, wd 0.001", "wd 0.001" or "k 5"
    best_epoch: int | None       # None: k-NN, or a head that diverged before any finite epoch
    val_accuracy: float | None   # None: diverged before any finite epoch (no scores)
    val_loss: float | None
    test_accuracy: float | None
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class RunReport:
    title: str
    facts: list[tuple[str, str]]          # key/value lines at the top
    heads: list[HeadSummary]
    chosen: int
    evaluation: Evaluation
    notes: list[str] = field(default_factory=list)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(heads: list[HeadSummary], chosen: int, path: Path) -> None:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), one colour per head.
    k-NN has no epochs: validation accuracy per k instead."""
    plt = _pyplot()
    if not any(h.history for h in heads):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([h.setting for h in heads], [h.val_accuracy for h in heads],
               color=["C1" if i == chosen else "C0" for i in range(len(heads))])
        ax.set_ylabel("validation accuracy")
        ax.set_title("k-NN: validation accuracy per setting (orange: chosen)")
        lo = min(h.val_accuracy for h in heads)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        _save(fig, path)
        plt.close(fig)
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, h in enumerate(heads):
        if not h.history:
            continue
        epochs = [r["epoch"] for r in h.history]
        color = f"C{i % 10}"
        label = h.setting + (" (chosen)" if i == chosen else "")
        width = 2.2 if i == chosen else 1.2
        ax_loss.plot(epochs, [r["train_loss"] for r in h.history], color=color, lw=width, label=f"{label} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in h.history], color=color, lw=width, ls="--", label=f"{label} val")
        ax_acc.plot(epochs, [r["train_accuracy"] for r in h.history], color=color, lw=width)
        ax_acc.plot(epochs, [r["val_accuracy"] for r in h.history], color=color, lw=width, ls="--")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: validation)")
    finite = [v for h in heads for r in h.history for v in (r["train_loss"], r["val_loss"]) if np.isfinite(v)]
    if finite and max(finite) / max(min(finite), 1e-12) > 50:
        ax_loss.set_yscale("log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (solid: train, dashed: validation)")
    ax_loss.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(ev: Evaluation, path: Path, title: str = "test confusion matrix") -> None:
    plt = _pyplot()
    n = len(ev.labels)
    size = max(4.5, min(14.0, 0.55 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    cm = ev.confusion
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), ev.labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), ev.labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (accuracy {ev.accuracy:.3f}, K={ev.k})")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def render_markdown(report: RunReport, curves: str | None = "curves.png",
                    confusion: str | None = "confusion.png") -> str:
    ev = report.evaluation
    lines = [f"# {report.title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.facts]
    lines += ["", "## Test", "", f"**{ev.bound_sentence()}**", "",
              f"Accuracy {ev.accuracy:.4f}, error e = {ev.error:.4f} on K = {ev.k} test examples; "
              f"bound e + sqrt(ln(1/delta) / (2K)) with delta = {ev.delta:g}. The head was chosen on "
              "validation, so the test examples played no part in choosing it.", ""]
    if report.heads:
        lines += ["## Heads", "", "Every head trained in the run; the chosen one (best on validation) is marked.", "",
                  "| | head | setting | best epoch | val acc | val loss | test acc | stopped |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, h in enumerate(report.heads):
            mark = "**>**" if i == report.chosen else ""
            epoch = "-" if h.best_epoch is None else str(h.best_epoch)
            lines.append(f"| {mark} | `{h.name}` | {h.setting} | {epoch} | {_fmt(h.val_accuracy)} | "
                         f"{_fmt(h.val_loss)} | {_fmt(h.test_accuracy)} | {h.stopped or '-'} |")
        lines.append("")
    lines += ["## Per class (test)", "", "| class | precision | recall | support |", "|---|---|---|---|"]
    for label, p, r, s in zip(ev.labels, ev.precision, ev.recall, ev.support):
        lines.append(f"| {label} | {p:.4f} | {r:.4f} | {int(s)} |")
    lines.append("")
    if curves:
        lines += ["## Curves", "", f"![loss and accuracy per epoch]({curves})", ""]
    if confusion:
        lines += ["## Confusion matrix", "", f"![confusion matrix]({confusion})", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(lines)


def write_report(folder: Path, report: RunReport, with_curves: bool = True) -> list[Path]:
    """report.md (+ curves.png, confusion.png) in ``folder``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if with_curves:
        plot_curves(report.heads, report.chosen, folder / "curves.png")
        written.append(folder / "curves.png")
    plot_confusion(report.evaluation, folder / "confusion.png")
    written.append(folder / "confusion.png")
    text = render_markdown(report, "curves.png" if with_curves else None)
    atomic_write_bytes(folder / "report.md", text.encode())
    written.append(folder / "report.md")
    return written

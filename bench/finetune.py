"""Benchmark (not a test): our heads against scikit-learn on the same cached features, and feature
extraction cold against from the cache, side by side in one run.

    .venv/bin/python bench/finetune.py [--backbone efficientnet_lite0] [--limit 1000] [--device cpu]
                                       [--epochs 30] [--cache-dir DIR]

Fashion-MNIST (Debian's dataset-fashion-mnist), a stratified subset of --limit images split as
`vfm finetune train` splits it. Extraction is timed into an empty cache (cold), then again
from that cache. On those features: our linear and MLP heads (sgd, one learning rate, and the
default four rates in one pass) against LogisticRegression (lbfgs) and MLPClassifier (adam,
same hidden sizes, batch and epochs), all on standardised features and the same thread count.
Prints test accuracy, fit time and the ratios our time / scikit-learn's time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FASHION = "idx:/usr/share/datasets/fashion-mnist"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--data", default=FASHION)
    p.add_argument("--limit", type=int, default=1000, help="images in all (default 1000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", default="512,256")
    p.add_argument("--cache-dir", help="cache for the cold/cached timing (default: a fresh temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="threads for torch and for scikit-learn's BLAS alike "
                   "(default: torch's default)")
    return p


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def extraction(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    from vfm.finetune.data import open_dataset
    from vfm.finetune.extractors import make_extractor
    from vfm.finetune.features import extract_features
    from vfm.finetune.splits import make_splits

    data = open_dataset(args.data)
    splits = make_splits(data, (0.8, 0.1, 0.1), args.seed, args.limit)
    union = splits.union()
    source = data.source.subset(union)
    with tempfile.TemporaryDirectory(prefix="vfm-bench-") as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        cold, cold_s = timed(lambda: extract_features(source, make_extractor(args.backbone, args.device), cache,
                                                      progress=True))
        warm, warm_s = timed(lambda: extract_features(source, make_extractor(args.backbone, args.device), cache,
                                                      progress=False))
    n = len(union)
    print(f"\n{args.data}: {n} images (train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}), "
          f"{args.backbone} features ({cold.features.shape[1]}-d) on {args.device}")
    print(f"feature extraction: cold {n / cold_s:9.1f} images/s ({cold.stats.computed} computed)   "
          f"cached {n / warm_s:11.1f} images/s ({warm.stats.cached} cached)   cached/cold x{cold_s / warm_s:,.0f}")
    pos = {int(i): p for p, i in enumerate(union)}
    x = {name: cold.features[[pos[int(i)] for i in idx]] for name, idx in splits.items()}
    y = {name: data.labels[idx] for name, idx in splits.items()}
    return x, y, list(data.classes)


def ours(x: dict[str, np.ndarray], y: dict[str, np.ndarray], classes: list[str], head: str,
         hidden: tuple[int, ...], lrs: tuple[float, ...], epochs: int, **options: Any) -> tuple[float, float]:
    import torch

    from vfm.finetune.train import TrainSettings, train_heads

    options.setdefault("patience", 0)
    settings = TrainSettings(head=head, hidden=hidden, lrs=lrs, epochs=epochs, threads=torch.get_num_threads(),
                             **options)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    yt = {k: torch.from_numpy(v) for k, v in y.items()}
    result, seconds = timed(lambda: train_heads(settings, t["train"], yt["train"], t["val"], yt["val"], len(classes)))
    chosen = result.model.unstack(result.best, classes, result.mean, result.std)
    return float(np.mean(chosen.predict(x["test"]) == y["test"])), seconds


def sklearn_fit(model: Any, x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import torch
    from threadpoolctl import threadpool_limits

    pipe = make_pipeline(StandardScaler(), model)
    with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
        warnings.simplefilter("ignore")  # ConvergenceWarning at the matched epoch budget
        _, seconds = timed(lambda: pipe.fit(x["train"], y["train"]))
    return float(pipe.score(x["test"], y["test"])), seconds


def main(args: argparse.Namespace) -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    x, y, classes = extraction(args)
    # LogisticRegression minimises 0.5|w|^2 + C * sum(loss) = N*C * (mean loss + |w|^2 / (2*N*C)):
    # weight decay 1 / (N*C) with C = 1 is the same objective (up to its unpenalised bias).
    lr_wd = 1.0 / len(y["train"])
    print(f"threads: {torch.get_num_threads()} for torch (extraction and our heads) and scikit-learn's BLAS")
    rows = [
        ("ours linear, sgd, lr 0.1", *ours(x, y, classes, "linear", (), (0.1,), args.epochs)),
        ("ours linear, sgd, 4 lrs in one pass", *ours(x, y, classes, "linear", (), (0.01, 0.03, 0.1, 0.3),
                                                      args.epochs)),
        ("ours linear, gd, LogisticRegression's objective", *ours(x, y, classes, "linear", (), (1.0, 10.0), 500,
                                                                  optimizer="gd", weight_decay=lr_wd)),
        ("sklearn LogisticRegression (lbfgs)", *sklearn_fit(LogisticRegression(max_iter=1000), x, y)),
        (f"ours mlp {args.hidden}, sgd, lr 0.01", *ours(x, y, classes, "mlp", hidden, (0.01,), args.epochs)),
        (f"ours mlp {args.hidden}, sgd, 4 lrs in one pass", *ours(x, y, classes, "mlp", hidden,
                                                                 (0.01, 0.03, 0.1, 0.3), args.epochs)),
        (f"sklearn MLPClassifier {args.hidden} (adam)",
         *sklearn_fit(MLPClassifier(hidden, batch_size=64, max_iter=args.epochs, random_state=args.seed), x, y)),
    ]
    print(f"\n{'head (' + str(len(y['train'])) + ' train, ' + str(len(y['test'])) + ' test)':50s} "
          f"{'test acc':>8s} {'fit s':>8s}")
    for name, acc, seconds in rows:
        print(f"{name:50s} {acc:8.4f} {seconds:8.2f}")
    lin1, lin4, lin_gd, lr_sk, mlp1, mlp4, mlp_sk = rows
    print("\nratios (fit time, ours / scikit-learn; accuracy, ours - scikit-learn):")
    print(f"  linear, 1 lr   vs LogisticRegression: time x{lin1[2] / lr_sk[2]:.2f}, accuracy {lin1[1] - lr_sk[1]:+.4f}")
    print(f"  linear, 4 lrs  vs LogisticRegression: time x{lin4[2] / lr_sk[2]:.2f}, accuracy {lin4[1] - lr_sk[1]:+.4f}")
    print(f"  linear, gd     vs LogisticRegression: time x{lin_gd[2] / lr_sk[2]:.2f}, "
          f"accuracy {lin_gd[1] - lr_sk[1]:+.4f} (same objective)")
    for label, row in (("mlp, 1 lr ", mlp1), ("mlp, 4 lrs", mlp4)):
        print(f"  {label}     vs MLPClassifier:      time x{row[2] / mlp_sk[2]:.2f}, "
              f"accuracy {row[1] - mlp_sk[1]:+.4f}")
    print(f"  4 lrs in one pass / 1 lr:  linear x{lin4[2] / lin1[2]:.2f}, mlp x{mlp4[2] / mlp1[2]:.2f} "
          "(4 separate runs would be about x4)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

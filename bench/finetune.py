"""Benchmark (not a test): feature extraction beside the backbone's bare batched ``embed``, and
our heads beside scikit-learn on the same cached features, side by side in one run.

    .venv/bin/python bench/finetune.py [--backbone efficientnet_lite0] [--limit 1000] [--device cpu]
                                       [--epochs 30] [--threads N] [--workers N] [--no-onnx]
                                       [--repository DIR] [--cache-dir DIR] [--pairs N]
    .venv/bin/python bench/finetune.py --heads-only [--cache-dir DIR]    # the heads part alone, on cached features

Fashion-MNIST (Debian's dataset-fashion-mnist), a stratified subset of --limit images split as
`vfm finetune train` splits it.

Extraction, the model loaded and warmed up first in every case, on the same threads:
  - bare: ``runner.embed`` on the images already decoded in memory, 64 at a time (the backbone's
    own speed, as a caller of the zoo gets it);
  - pipeline: ``extract_features`` into an empty cache (reading, DataLoader workers, the
    channels-last forward, the cache written chunk by chunk), with its ratio to bare;
  - the same two on ONNX Runtime (the export found in --repository, else made in a temporary one);
  - the pipeline again from the cache.
With --heads-only there are no extraction rows: the features come from the feature cache (--cache-dir,
default the one `vfm finetune train` uses, $VFM_CACHE/features), computed there once if missing, so
that the heads can be measured again and again in seconds.
Heads, on the torch features, each fitted --repeats times after an untimed warm-up fit of every
contestant (best wall and CPU time shown): ours (linear by sgd, the default four rates in one pass;
linear by lbfgs at its default C = 1, LogisticRegression's objective, and along the C path 0.01..10
chosen on validation; the MLP at its default rates 0.01,0.1, at 0.01 alone, and at 0.01..0.3 with
patience 10) against LogisticRegression (lbfgs, C=1), LogisticRegressionCV (the same C grid, chosen by
5-fold cross-validation on train: the path's like-for-like row) and MLPClassifier (adam, same hidden
sizes, batch and epochs), all trained on the same training split, on standardised features and the
same thread count (--head-threads): test accuracy, fit time, and the ratios. Then --pairs N fits of our default
lbfgs linear head and of LogisticRegression in turn, and the median of the paired time ratios: both fit in
50-80 ms, where best-of-3 rows move by 30%. --slow-rows adds MLPs
with weight-decay grids (sgd and lbfgs).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _args import OneLineParser  # noqa: E402

FASHION = "idx:/usr/share/datasets/fashion-mnist"
HEAD_THREADS = [1]  # --head-threads
HEAD_REPEATS = [1]  # --repeats


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--data", default=FASHION)
    p.add_argument("--limit", type=int, default=1000, help="images in all (default 1000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", default="512,256")
    p.add_argument("--cache-dir", help="feature cache for the pipeline runs (default: a fresh temporary folder);\n"
                   "with --heads-only, where the features are read (default: $VFM_CACHE/features)")
    p.add_argument("--heads-only", action="store_true", help="no extraction rows: the heads on features from the "
                   "feature cache,\ncomputed there once if missing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="threads for torch and for scikit-learn's BLAS alike "
                   "(default: torch's default)")
    p.add_argument("--head-threads", type=int, default=1, help="threads of the head fits, ours and scikit-learn's "
                   "alike (default 1: what ours picks by itself for\nsteps this small; two threads spin against each "
                   "other on a busy machine)")
    p.add_argument("--repeats", type=int, default=3, help="fits of each head; each row shows the least wall and "
                   "CPU time (default 3)")
    p.add_argument("--pairs", type=int, default=20, help="after the table, this many fits of our default lbfgs linear "
                   "head and of LogisticRegression,\ninterleaved, and the median of their paired time ratios (fits of "
                   "~50 ms: best-of-3 rows move by 30%%) (default 20; 0: off)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the pipeline (default: the pipeline's)")
    p.add_argument("--slow-rows", action="store_true", help="also the MLP rows with weight-decay grids (sgd and "
                   "lbfgs): about a minute each")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    p.add_argument("--repository", help="where the ONNX export is (default: exported into a temporary folder)")
    p.add_argument("--rounds", type=int, default=1, help="extraction rounds, bare and pipeline interleaved; each "
                   "row shows its best round (default 1; more on a shared machine)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse bad values and combinations in one line (exit 2) before anything is loaded."""
    for name, low in (("limit", 3), ("epochs", 1), ("head_threads", 1), ("rounds", 1), ("threads", 1), ("repeats", 1),
                      ("workers", 0), ("pairs", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} {value}: give {low} or more")
    try:
        args.hidden_sizes = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        args.hidden_sizes = ()
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        p.error(f"--hidden {args.hidden!r}: give widths of 1 or more, comma-separated (e.g. 512,256)")
    if args.heads_only:
        for name, given in (("--rounds", args.rounds != 1), ("--repository", args.repository is not None),
                            ("--workers", args.workers is not None), ("--no-onnx", args.no_onnx)):
            if given:
                p.error(f"{name} is for the extraction rows, which --heads-only skips")
    return args


def best_of(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """A head fit HEAD_REPEATS[0] times: its last result, the least wall time and the least CPU time (of this
    process: on one thread, what the fit costs whatever else the machine runs)."""
    walls, cpus = [], []
    for _ in range(HEAD_REPEATS[0]):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, min(walls), min(cpus)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _bare_embed(runner: Any, images: list[np.ndarray], batch: int = 64) -> float:
    runner.embed(images[:batch])  # warm-up
    _, seconds = timed(lambda: [runner.embed(images[i:i + batch]) for i in range(0, len(images), batch)])
    return len(images) / seconds


def _pipeline(source: Any, args: argparse.Namespace, cache: Path, images: list[np.ndarray], **backend: Any
              ) -> tuple[Any, float]:
    from vfm.finetune.extractors import make_extractor
    from vfm.finetune.features import extract_features

    extractor = make_extractor(args.backbone, args.device, **backend)
    extractor.embed(images[:64])  # load and warm up, as for bare
    extractor.key()
    feats, seconds = timed(lambda: extract_features(source, extractor, cache, progress=False, workers=args.workers))
    return feats, len(source) / seconds


def extraction(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    from vfm.finetune.data import open_dataset
    from vfm.finetune.extractors import make_extractor
    from vfm.finetune.features import extract_features
    from vfm.finetune.splits import make_splits
    from vfm.models import load_model

    data = open_dataset(args.data)
    splits = make_splits(data, (0.8, 0.1, 0.1), args.seed, args.limit)
    union = splits.union()
    source = data.source.subset(union)
    images = [source.load(i) for i in range(len(source))]
    n = len(union)
    cache = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
    backends: dict[str, dict[str, Any]] = {"torch": {}}
    if not args.no_onnx:
        repository = Path(args.repository) if args.repository else tmp / "model_repository"
        if not args.repository:
            from vfm.models.export import export_model

            print(f"exporting {args.backbone} to ONNX in {repository} ...", flush=True)
            export_model(args.backbone, repository)
        backends["onnx"] = {"backend": "onnx", "repository": repository}
    best: dict[str, list[float]] = {name: [0.0, 0.0] for name in backends}
    feats: dict[str, Any] = {}
    for r in range(args.rounds):  # interleaved, so that a busy spell of the machine hits every row alike
        for name, backend in backends.items():
            # bare: torch as the zoo loads it; onnx: the session the pipeline opens (torch's threads, no spinning)
            runner = (load_model(args.backbone, device=args.device) if name == "torch"
                      else make_extractor(args.backbone, args.device, **backend).runner)
            best[name][0] = max(best[name][0], _bare_embed(runner, images))
            del runner
            feats[name], pipe = _pipeline(source, args, cache / f"{name}-{r}", images, **backend)
            best[name][1] = max(best[name][1], pipe)
            print(f"round {r + 1}: {name} bare {best[name][0]:.1f}, pipeline {pipe:.1f} images/s", flush=True)
    cold = feats["torch"]
    if "onnx" in feats:
        print(f"onnx features vs torch features: max |difference| {np.abs(feats['onnx'].features - cold.features).max():.2e} "
              f"(features up to {np.abs(cold.features).max():.2f})")
    rows = [(name, b, p, feats[name].stats.computed) for name, (b, p) in best.items()]
    warm, warm_s = timed(lambda: extract_features(source, make_extractor(args.backbone, args.device), cache / "torch-0",
                                                  progress=False))
    print(f"\n{args.data}: {n} images (train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}), "
          f"{args.backbone} features ({cold.features.shape[1]}-d) on {args.device}, {torch_threads()} threads")
    print(f"{'extraction (images/s)':24s} {'bare embed':>10s} {'pipeline':>10s} {'pipeline/bare':>14s}"
          + (f"   (best of {args.rounds} rounds)" if args.rounds > 1 else ""))
    for backend, b, p, computed in rows:
        print(f"{backend:24s} {b:10.1f} {p:10.1f} {p / b:14.2f}   ({computed} computed)")
    print(f"{'cached (torch)':24s} {'':10s} {n / warm_s:10.1f}   ({warm.stats.cached} from the cache)")
    pos = {int(i): p for p, i in enumerate(union)}
    x = {name: cold.features[[pos[int(i)] for i in idx]] for name, idx in splits.items()}
    y = {name: data.labels[idx] for name, idx in splits.items()}
    return x, y, list(data.classes)


def cached_features(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """--heads-only: the split features from the feature cache (extracted into it first if missing)."""
    from vfm.finetune.config import FeatureOptions
    from vfm.finetune.data import open_dataset
    from vfm.finetune.extractors import make_extractor
    from vfm.finetune.features import extract_features
    from vfm.finetune.splits import make_splits

    data = open_dataset(args.data)
    splits = make_splits(data, (0.8, 0.1, 0.1), args.seed, args.limit)
    union = splits.union()
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else FeatureOptions().cache_folder()
    feats = extract_features(data.source.subset(union), make_extractor(args.backbone, args.device), cache)
    print(f"{args.data}: {len(union)} images (train {len(splits.train)}, val {len(splits.val)}, test "
          f"{len(splits.test)}), {args.backbone} features ({feats.features.shape[1]}-d): "
          f"{feats.stats.cached} from the cache in {cache}, {feats.stats.computed} computed")
    pos = {int(i): p for p, i in enumerate(union)}
    x = {name: feats.features[[pos[int(i)] for i in idx]] for name, idx in splits.items()}
    y = {name: data.labels[idx] for name, idx in splits.items()}
    return x, y, list(data.classes)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def our_fit(x: dict[str, np.ndarray], y: dict[str, np.ndarray], classes: list[str], head: str,
            hidden: tuple[int, ...], epochs: int | None = None, **options: Any) -> Callable[[], Any]:
    """One fit of our heads on the training split (scored on validation), as a call to time."""
    import torch

    from vfm.finetune.train import TrainSettings, train_heads

    settings = TrainSettings(head=head, hidden=hidden, epochs=epochs, threads=HEAD_THREADS[0], **options)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    yt = {k: torch.from_numpy(v) for k, v in y.items()}
    return lambda: train_heads(settings, t["train"], yt["train"], t["val"], yt["val"], len(classes))


def ours(x: dict[str, np.ndarray], y: dict[str, np.ndarray], classes: list[str], head: str,
         hidden: tuple[int, ...], epochs: int | None = None, **options: Any) -> tuple[float, float, str]:
    result, seconds, cpu = best_of(our_fit(x, y, classes, head, hidden, epochs, **options))
    chosen = result.model.unstack(result.best, classes, result.mean, result.std)
    return float(np.mean(chosen.predict(x["test"]) == y["test"])), seconds, cpu, result.runs[result.best].name


def sklearn_fit(model: Any, x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float, str]:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    pipe = make_pipeline(StandardScaler(), model)
    with warnings.catch_warnings(), threadpool_limits(HEAD_THREADS[0]):
        warnings.simplefilter("ignore")  # ConvergenceWarning at the matched epoch budget
        _, seconds, cpu = best_of(lambda: pipe.fit(x["train"], y["train"]))
    return float(pipe.score(x["test"], y["test"])), seconds, cpu, ""


def warm_up(x: dict[str, np.ndarray], y: dict[str, np.ndarray], classes: list[str], hidden: tuple[int, ...]) -> None:
    """One untimed fit of each contestant on a slice of the data: the first call of a solver in a process pays
    one-off costs (lazy imports and initialisations: 0.05-0.2 s, on either side) that no later fit pays."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    part = {k: v[:200] for k, v in x.items()}, {k: v[:200] for k, v in y.items()}
    ours(*part, classes, "linear", (), 1)
    ours(*part, classes, "linear", (), optimizer="lbfgs")
    ours(*part, classes, "mlp", hidden, 1)
    sklearn_fit(LogisticRegression(max_iter=1000), *part)
    sklearn_fit(MLPClassifier(hidden, batch_size=64, max_iter=1), *part)


def main(args: argparse.Namespace) -> int:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.neural_network import MLPClassifier

    from vfm.finetune.config import LBFGS_GRID_CS

    import torch
    import torch._dynamo  # noqa: F401  torch.optim's first optimiser imports it (1-4 s, once a process):
    # imported here, outside the timings, as scikit-learn's modules are above

    if args.threads:
        torch.set_num_threads(args.threads)
    HEAD_THREADS[0] = args.head_threads
    hidden = args.hidden_sizes
    if args.heads_only:
        x, y, classes = cached_features(args)
    else:
        with tempfile.TemporaryDirectory(prefix="vfm-bench-") as tmp:
            x, y, classes = extraction(args, Path(tmp))
    e = args.epochs
    n = len(y["train"])
    # torch on the heads' threads for the whole heads part, as scikit-learn's are set (threadpool_limits)
    # outside its timings: a switch of thread count costs a few ms, paid once by a real run
    torch.set_num_threads(args.head_threads)
    warm_up(x, y, classes, hidden)
    HEAD_REPEATS[0] = args.repeats
    rows = [
        ("ours linear, sgd, 4 lrs in one pass (default sgd)", *ours(x, y, classes, "linear", (), e)),
        # the linear head the README points to: --optimizer lbfgs, by default one fit at C = 1. LogisticRegression
        # minimises 0.5|w|^2 + C * sum(loss) = N*C * (mean loss + |w|^2 / (2*N*C)): weight decay 1 / (N*C) at
        # C = 1 is its objective (up to its unpenalised bias).
        ("ours linear, lbfgs, C=1 (default lbfgs)", *ours(x, y, classes, "linear", (), optimizer="lbfgs")),
        ("ours linear, lbfgs, --C 0.01,0.1,1,10 path", *ours(x, y, classes, "linear", (), optimizer="lbfgs",
                                                             cs=LBFGS_GRID_CS)),
        ("sklearn LogisticRegression (lbfgs, C=1)", *sklearn_fit(LogisticRegression(max_iter=1000), x, y)),
        # the like-for-like reference of the path: C chosen (5-fold on train) from the same C grid
        ("sklearn LogisticRegressionCV (C 0.01..10, 5-fold)",
         *sklearn_fit(LogisticRegressionCV(Cs=list(LBFGS_GRID_CS), cv=5, max_iter=1000), x, y)),
        (f"ours mlp {args.hidden}, sgd, lrs 0.01,0.1 (default)", *ours(x, y, classes, "mlp", hidden, e)),
        # one rate, as MLPClassifier fits one (0.01: the rate the default pass chooses on these features)
        (f"ours mlp {args.hidden}, sgd, lr 0.01 alone", *ours(x, y, classes, "mlp", hidden, e, lrs=(0.01,))),
        (f"ours mlp {args.hidden}, sgd, 4 lrs 0.01..0.3, pat. 10", *ours(x, y, classes, "mlp", hidden, e,
                                                                         lrs=(0.01, 0.03, 0.1, 0.3), patience=10)),
        (f"sklearn MLPClassifier {args.hidden} (adam)",
         *sklearn_fit(MLPClassifier(hidden, batch_size=64, max_iter=e, random_state=args.seed), x, y)),
    ]
    if args.slow_rows:
        rows += [
            (f"ours mlp {args.hidden}, sgd, 2 lrs x wd 0,1e-4,1e-3", *ours(x, y, classes, "mlp", hidden, e,
                                                                          weight_decay=(0.0, 1e-4, 1e-3))),
            (f"ours mlp {args.hidden}, lbfgs, wd 0.1..1e-3", *ours(x, y, classes, "mlp", hidden, 100,
                                                                   optimizer="lbfgs",
                                                                   weight_decay=(0.1, 0.03, 0.01, 0.003, 0.001))),
        ]
    print(f"\nheads on {args.head_threads} thread(s), ours and scikit-learn's alike, best of {args.repeats} fits each; "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"\n{'head (' + str(n) + ' train, ' + str(len(y['test'])) + ' test)':52s} "
          f"{'test acc':>8s} {'fit s':>8s} {'cpu s':>8s}  chosen on validation")
    for name, acc, seconds, cpu, chosen in rows:
        print(f"{name:52s} {acc:8.4f} {seconds:8.3f} {cpu:8.3f}  {chosen}")
    lr_sk, lrcv_sk, mlp_sk = rows[3], rows[4], rows[8]
    print(f"\nratios (ours / scikit-learn: wall time, CPU time; accuracy, ours - scikit-learn), all trained on the same "
          f"{n} images:")
    pairs = [(rows[0], lr_sk), (rows[1], lr_sk), (rows[2], lr_sk), (rows[2], lrcv_sk), (rows[5], mlp_sk),
             (rows[6], mlp_sk), (rows[7], mlp_sk)] + [(row, mlp_sk) for row in rows[9:]]
    for row, ref in pairs:
        print(f"  {row[0]:52s} vs {ref[0].split(' (')[0]:30s}: time x{row[2] / ref[2]:.2f}, cpu x{row[3] / ref[3]:.2f}, "
              f"accuracy {row[1] - ref[1]:+.4f}")
    if args.pairs:
        paired_lbfgs(x, y, classes, args.pairs)
    return 0


def paired_lbfgs(x: dict[str, np.ndarray], y: dict[str, np.ndarray], classes: list[str], pairs: int) -> None:
    """Our default lbfgs linear head and LogisticRegression fitted in turn ``pairs`` times: the median of the paired
    wall-time ratios and its quartiles (a pair shares the machine's state, so load moves both sides alike)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    fit = our_fit(x, y, classes, "linear", (), optimizer="lbfgs")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))  # refitted from scratch each time
    ratios = []
    with warnings.catch_warnings(), threadpool_limits(HEAD_THREADS[0]):
        warnings.simplefilter("ignore")
        for _ in range(pairs):
            _, ours_s = timed(fit)
            _, sk_s = timed(lambda: pipe.fit(x["train"], y["train"]))
            ratios.append(ours_s / sk_s)
    q1, median, q3 = np.quantile(ratios, (0.25, 0.5, 0.75))
    print(f"\n{pairs} interleaved pairs, ours linear lbfgs C=1 / LogisticRegression C=1: median time ratio x{median:.2f} "
          f"(quartiles x{q1:.2f}-x{q3:.2f})")


if __name__ == "__main__":
    parser = get_args_parser()
    sys.exit(main(check_args(parser, parser.parse_args())))

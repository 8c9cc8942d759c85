"""`vfm finetune train | eval | publish`.

The parsers (``add_*_arguments``) are apart from the commands (``cmd_*``), which turn the
arguments into a config (``train_config``) and call the pipeline, torchvision-references style.
Every flag is checked here and a bad one is a one-line usage error. Flags default to ``None`` so
that a flag given to a head or optimiser it does not apply to is refused, not silently ignored.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

HEADS = ("knn", "linear", "mlp")
LOSSES = ("ce", "hinge", "squared")
OPTIMIZERS = ("sgd", "gd")
SCHEDULES = ("cosine", "step", "constant")
METRICS = ("cosine", "l2")
SUBSETS = ("auto", "test", "all")
DEFAULT_LRS = {"sgd": "0.01,0.03,0.1,0.3", "gd": "0.1,1,10"}
DEFAULT_EPOCHS = {"sgd": 30, "gd": 200}

# flag -> (heads it applies to, optimisers it applies to)
_APPLIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "k": (("knn",), OPTIMIZERS), "metric": (("knn",), OPTIMIZERS),
    "hidden": (("mlp",), OPTIMIZERS), "dropout": (("mlp",), ("sgd",)),
    "loss": (("linear", "mlp"), OPTIMIZERS), "optimizer": (("linear", "mlp"), OPTIMIZERS),
    "lr": (("linear", "mlp"), OPTIMIZERS), "epochs": (("linear", "mlp"), OPTIMIZERS),
    "weight_decay": (("linear", "mlp"), OPTIMIZERS), "resume": (("linear", "mlp"), OPTIMIZERS),
    "batch_size": (("linear", "mlp"), ("sgd",)), "momentum": (("linear", "mlp"), ("sgd",)),
    "nesterov": (("linear", "mlp"), ("sgd",)), "schedule": (("linear", "mlp"), ("sgd",)),
    "step_epochs": (("linear", "mlp"), ("sgd",)), "patience": (("linear", "mlp"), ("sgd",)),
    "tol": (("linear", "mlp"), ("gd",)),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    ft = subparsers.add_parser("finetune", help="train heads on frozen backbone features, evaluate, publish",
                               description="Train k-NN, linear or MLP heads on the frozen features of a zoo "
                                           "backbone; evaluate them; publish them to the service's heads folder.")
    sub = ft.add_subparsers(dest="finetune_command", metavar="COMMAND", required=True)
    add_train_arguments(sub.add_parser("train", help="extract features, train heads, write a run folder"))
    add_eval_arguments(sub.add_parser("eval", help="re-evaluate a run's head on data"))
    add_publish_arguments(sub.add_parser("publish", help="copy a run's head into a heads folder"))


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_train)
    g = p.add_argument_group("what to train")
    g.add_argument("--backbone", metavar="NAME", help="a zoo backbone (`vfm models list --task embed`), "
                   "or pixels[:SIZE][:rgb] for a raw-pixel baseline (required)")
    g.add_argument("--data", metavar="SPEC", help="an ImageFolder folder, a .csv manifest "
                   "(path,label[,split]) or idx:FOLDER (MNIST-style idx files) (required)")
    g.add_argument("--head", metavar="knn|linear|mlp", default="linear", help="default linear")
    g.add_argument("--k", metavar="K[,K...]", help="knn: neighbours; a list is chosen on validation (default 5)")
    g.add_argument("--metric", metavar="cosine|l2", help="knn distance (default cosine)")
    g.add_argument("--hidden", metavar="W[,W...]", help="mlp hidden widths (default 512,256)")
    g.add_argument("--dropout", metavar="P", help="mlp with sgd: dropout after each hidden layer (default 0)")
    g.add_argument("--loss", metavar="ce|hinge|squared", help="default ce; hinge is binary (2 classes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", metavar="sgd|gd", help="sgd (default) or gd: full batch, the step halved "
                   "until the loss falls")
    g.add_argument("--lr", metavar="LR[,LR...]", help="one head per rate in one pass, the best on validation "
                   f"kept (default sgd {DEFAULT_LRS['sgd']}, gd {DEFAULT_LRS['gd']})")
    g.add_argument("--epochs", metavar="N", help="epochs; gd: iterations (default sgd 30, gd 200)")
    g.add_argument("--batch-size", metavar="B", help="sgd mini-batch size (default 64)")
    g.add_argument("--momentum", metavar="M", help="sgd momentum (default 0.9)")
    g.add_argument("--nesterov", action="store_const", const=True, help="sgd: Nesterov momentum")
    g.add_argument("--weight-decay", metavar="W", help="L2 weight decay (default 0)")
    g.add_argument("--schedule", metavar="cosine|step|constant", help="sgd learning-rate schedule "
                   "(default cosine)")
    g.add_argument("--step-epochs", metavar="N", help="step schedule: x0.1 every N epochs (default epochs/3)")
    g.add_argument("--patience", metavar="N", help="sgd: stop a head after N epochs without a better "
                   "validation score (default 10; 0: off)")
    g.add_argument("--tol", metavar="T", help="gd: stop when the gradient norm is under T (default 1e-4)")
    g = p.add_argument_group("data")
    g.add_argument("--split", metavar="TRAIN,VAL,TEST", help="fractions for the splits the data does not "
                   "give itself (default 0.8,0.1,0.1)")
    g.add_argument("--seed", metavar="S", help="seeds the splits, initial weights and shuffling (default 0)")
    g.add_argument("--limit", metavar="N", help="at most N examples in all, stratified (tests, demos)")
    g.add_argument("--classes", metavar="A,B[,...]", help="keep only these classes, e.g. two for hinge")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/<data>-<backbone>-<head>)")
    g.add_argument("--resume", action="store_const", const=True, help="continue the interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--delta", metavar="D", help="the test-error bound holds with probability 1 - D "
                   "(default 0.05)")
    _add_feature_arguments(p)


def _add_feature_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--device", metavar="DEVICE", default="auto", help="backbone device: auto (default), cpu, "
                   "cuda or cuda:N")
    g.add_argument("--normalize", action="store_true", help="L2-normalise the backbone's features (recorded "
                   "in head.json, so the service does the same)")
    g.add_argument("--cache-dir", metavar="DIR", help="feature cache (default $VFM_CACHE/features)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    g.add_argument("--extract-batch-size", metavar="N", help="images per backbone forward pass (default 64)")
    g.add_argument("--ray-address", metavar="ADDR", help="extract with Ray Data: a cluster address, auto, "
                   "or local (start Ray here)")
    g.add_argument("--ray-actors", metavar="N", help="Ray: actors in the pool (default one per GPU, else 2)")
    g.add_argument("--ray-gpus", metavar="G", help="Ray: GPUs per actor (default 1 on a GPU cluster, else 0)")
    g.add_argument("--threads", metavar="N", help="torch threads for extraction and training (default: "
                   "torch's, and 1 to train small heads)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_eval)
    p.add_argument("run", nargs="?", metavar="RUN", help="a run folder, or any folder with head.json and "
                   "head.safetensors")
    p.add_argument("--data", metavar="SPEC", help="data spec, as for train (required)")
    p.add_argument("--subset", metavar="auto|test|all", default="auto", help="test: the data's own test "
                   "split; all; auto (default): test when the data has one, else all")
    p.add_argument("--limit", metavar="N", help="at most N examples, stratified")
    p.add_argument("--seed", metavar="S", help="seed of the --limit subset (default 0)")
    p.add_argument("--delta", metavar="D", help="the bound holds with probability 1 - D (default 0.05)")
    p.add_argument("--out", metavar="DIR", help="report folder (default RUN/eval-<data>)")
    _add_feature_arguments(p)


def add_publish_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_publish)
    p.add_argument("run", nargs="?", metavar="RUN", help="a run folder")
    p.add_argument("--to", metavar="HEADS_DIR", help="the service's heads folder (required)")
    p.add_argument("--name", metavar="NAME", help="served as /v1/heads/NAME (default: the run folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace a published head of the same name")


def _required(args: argparse.Namespace, *names: str) -> None:
    # Checked here rather than by argparse, whose usage dump is not one line.
    for name in names:
        if getattr(args, name) in (None, ""):
            flag = "RUN" if name == "run" else "--" + name.replace("_", "-")
            raise _usage(f"{flag} is required (see --help)")


# ---- value parsing ------------------------------------------------------------------------

def _usage(message: str) -> Exception:
    from vfm.models.errors import UsageError

    return UsageError(message)


def _number(text: str, flag: str, cast: Callable[[str], Any], low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Any:
    try:
        value = cast(text.strip())
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise _usage(f"{flag} {text!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _usage(f"{flag} must be finite, got {text!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise _usage(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {text}")
    if high is not None and (value > high or (high_open and value == high)):
        raise _usage(f"{flag} must be {'<' if high_open else '<='} {high:g}, got {text}")
    return value


def _list(text: str, flag: str, cast: Callable[[str], Any], **bounds: Any) -> tuple:
    parts = [t for t in text.split(",")]
    if not text.strip() or any(not t.strip() for t in parts):
        raise _usage(f"{flag} {text!r}: give a comma-separated list without empty items")
    values = tuple(_number(t, flag, cast, **bounds) for t in parts)
    if len(set(values)) != len(values):
        raise _usage(f"{flag} {text!r} repeats a value")
    return values


def _choice(value: str | None, flag: str, choices: tuple[str, ...], default: str) -> str:
    value = default if value is None else value.strip().lower()
    if value not in choices:
        raise _usage(f"{flag} {value!r}: use one of {', '.join(choices)}")
    return value


def _ray_options(args: argparse.Namespace) -> Any:
    if args.ray_address is None:
        for flag in ("ray_actors", "ray_gpus"):
            if getattr(args, flag) is not None:
                raise _usage(f"--{flag.replace('_', '-')} needs --ray-address")
        return None
    from .features_ray import RayOptions

    actors = _number(args.ray_actors, "--ray-actors", int, 1) if args.ray_actors else None
    gpus = _number(args.ray_gpus, "--ray-gpus", float, 0) if args.ray_gpus else None
    return RayOptions(args.ray_address.strip(), actors, gpus)


def _feature_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.no_cache and args.cache_dir:
        raise _usage("--cache-dir and --no-cache contradict each other")
    return {"threads": _number(args.threads, "--threads", int, 1) if args.threads else None,
            "device": args.device, "cache_dir": Path(args.cache_dir).expanduser() if args.cache_dir else None,
            "use_cache": not args.no_cache, "ray": _ray_options(args), "progress": not args.quiet,
            "batch_size": _number(args.extract_batch_size, "--extract-batch-size", int, 1)
            if args.extract_batch_size else 64}


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text.split(":", 1)[-1]).name or text).strip("_") or "data"


def train_config(args: argparse.Namespace) -> Any:
    """Check every train flag and build the pipeline's ``TrainConfig``."""
    from .pipeline import TrainConfig
    from .train import TrainSettings

    _required(args, "backbone", "data")
    head = _choice(args.head, "--head", HEADS, "linear")
    optimizer = _choice(args.optimizer, "--optimizer", OPTIMIZERS, "sgd") if head != "knn" else "sgd"
    for flag, (heads, optimizers) in _APPLIES.items():
        if getattr(args, flag) is None:
            continue
        name = "--" + flag.replace("_", "-")
        if head not in heads:
            raise _usage(f"{name} does not apply to --head {head} (it is for: {', '.join(heads)})")
        if optimizer not in optimizers:
            raise _usage(f"{name} does not apply to --optimizer {optimizer} (it is for: {', '.join(optimizers)})")
    if args.resume and args.overwrite:
        raise _usage("--resume and --overwrite contradict each other")
    split = (0.8, 0.1, 0.1)
    if args.split is not None:
        parts = args.split.split(",")
        if len(parts) != 3:
            raise _usage(f"--split {args.split!r}: give three fractions train,val,test")
        split = tuple(_number(t, "--split", float, 0, 1) for t in parts)
        if abs(sum(split) - 1) > 1e-6 or split[0] <= 0 or split[1] <= 0:
            raise _usage(f"--split {args.split}: three fractions that sum to 1, with train and val above 0 "
                         "(heads are chosen on validation)")
    feature = _feature_options(args)
    settings = None
    if head != "knn":
        loss = _choice(args.loss, "--loss", LOSSES, "ce")
        hidden = _list(args.hidden, "--hidden", int, low=1) if args.hidden else ((512, 256) if head == "mlp" else ())
        settings = TrainSettings(
            head=head, hidden=hidden, loss=loss, optimizer=optimizer,
            dropout=_number(args.dropout, "--dropout", float, 0, 1, high_open=True) if args.dropout else 0.0,
            lrs=_list(args.lr or DEFAULT_LRS[optimizer], "--lr", float, low=0, low_open=True),
            epochs=_number(args.epochs, "--epochs", int, 1) if args.epochs else DEFAULT_EPOCHS[optimizer],
            batch_size=_number(args.batch_size, "--batch-size", int, 1) if args.batch_size else 64,
            momentum=_number(args.momentum, "--momentum", float, 0, 1, high_open=True) if args.momentum else 0.9,
            nesterov=bool(args.nesterov),
            weight_decay=_number(args.weight_decay, "--weight-decay", float, 0) if args.weight_decay else 0.0,
            schedule=_choice(args.schedule, "--schedule", SCHEDULES, "cosine"),
            step_epochs=_number(args.step_epochs, "--step-epochs", int, 1) if args.step_epochs else None,
            patience=_number(args.patience, "--patience", int, 0) if args.patience else 10,
            tol=_number(args.tol, "--tol", float, 0, low_open=True) if args.tol else 1e-4,
            seed=_number(args.seed, "--seed", int, 0) if args.seed else 0, threads=feature["threads"])
        if settings.nesterov and settings.momentum == 0:
            raise _usage("--nesterov needs a --momentum above 0")
        if args.step_epochs and settings.schedule != "step":
            raise _usage("--step-epochs is for --schedule step")
    default_out = Path("runs") / f"{_slug(args.data)}-{_slug(args.backbone)}-{head}"
    out = Path(args.out).expanduser() if args.out else default_out
    cfg = TrainConfig(
        backbone=args.backbone.strip(), data=args.data.strip(), out=out, head=head,
        ks=_list(args.k, "--k", int, low=1) if args.k else (5,),
        metric=_choice(args.metric, "--metric", METRICS, "cosine"),
        split=split, seed=_number(args.seed, "--seed", int, 0) if args.seed else 0,
        limit=_number(args.limit, "--limit", int, 3) if args.limit else None,
        classes=_classes(args.classes), resume=bool(args.resume), overwrite=args.overwrite,
        delta=_number(args.delta, "--delta", float, 0, 1, low_open=True, high_open=True) if args.delta else 0.05,
        cache_dir=feature["cache_dir"], use_cache=feature["use_cache"], device=feature["device"],
        normalize=args.normalize, extract_batch_size=feature["batch_size"], ray=feature["ray"],
        progress=feature["progress"])
    if settings is not None:
        cfg.settings = settings
    return cfg


def _classes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(","))
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise _usage(f"--classes {text!r}: give at least two distinct class names, comma-separated")
    return names


# ---- commands ------------------------------------------------------------------------------

def _known_errors() -> tuple[type[Exception], ...]:
    from vfm.models import UnknownModel

    from .checkpoint import CheckpointMismatch
    from .extractors import BackboneError
    from .pipeline import RunExists

    return (UnknownModel, BackboneError, RunExists, CheckpointMismatch)


def _use_threads(count: int | None) -> None:
    if count:  # the whole command: the backbone's forward passes and the heads' training
        import torch

        torch.set_num_threads(count)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    _use_threads(cfg.settings.threads if cfg.head != "knn" else _feature_options(args)["threads"])
    from .pipeline import train_run

    try:
        summary = train_run(cfg)
    except _known_errors() as exc:
        raise _usage(str(exc)) from None
    except KeyboardInterrupt:
        print(f"vfm: interrupted; `vfm finetune train ... --out {cfg.out} --resume` continues from the last "
              "checkpoint", file=sys.stderr)
        raise
    ev = summary.evaluation
    if summary.resumed_from:
        print(f"resumed after epoch {summary.resumed_from}")
    print(f"run: {summary.out}  (train {summary.counts['train']}, val {summary.counts['val']}, "
          f"test {summary.counts['test']}; features: {summary.stats.cached} cached, {summary.stats.computed} "
          f"computed, {summary.stats.skipped} unreadable skipped)")
    for h in summary.heads:
        mark = "*" if h.name == summary.chosen else " "
        print(f" {mark} {h.name:40s} val {h.val_accuracy:.4f}  test {h.test_accuracy:.4f}"
              + (f"  ({h.stopped})" if h.stopped else ""))
    print(f"chosen on validation: {summary.chosen}; test accuracy {ev.accuracy:.4f}")
    print(ev.bound_sentence())
    print(f"report: {summary.out / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vfm.models.heads import InvalidHead

    from .runs import eval_run

    _required(args, "run", "data")
    subset = _choice(args.subset, "--subset", SUBSETS, "auto")
    feature = _feature_options(args)
    _use_threads(feature["threads"])
    try:
        result = eval_run(Path(args.run).expanduser(), args.data.strip(), subset,
                          limit=_number(args.limit, "--limit", int, 1) if args.limit else None,
                          seed=_number(args.seed, "--seed", int, 0) if args.seed else 0,
                          delta=_number(args.delta, "--delta", float, 0, 1, low_open=True, high_open=True)
                          if args.delta else 0.05,
                          out=Path(args.out).expanduser() if args.out else None, device=feature["device"],
                          cache_dir=feature["cache_dir"], use_cache=feature["use_cache"],
                          batch_size=feature["batch_size"], ray=feature["ray"], progress=feature["progress"])
    except (InvalidHead, *_known_errors()) as exc:
        raise _usage(str(exc)) from None
    ev = result.evaluation
    print(f"{args.data} ({result.subset}): accuracy {ev.accuracy:.4f} on {ev.k} examples"
          + (f", {result.stats.skipped} unreadable skipped" if result.stats.skipped else ""))
    print(ev.bound_sentence())
    print(f"report: {result.out / 'report.md'}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from vfm.models.heads import InvalidHead

    from .runs import publish

    _required(args, "run", "to")
    try:
        dest = publish(Path(args.run).expanduser(), Path(args.to).expanduser(), args.name, args.overwrite)
    except (InvalidHead, FileExistsError, ValueError) as exc:  # ValueError: a head name unfit for a URL
        raise _usage(str(exc)) from None
    print(f"published {args.run} as {dest}")
    return 0

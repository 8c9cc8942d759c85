"""`vfm finetune train | eval | publish`.

The parsers (``add_*_arguments``) are apart from the commands (``cmd_*``), torchvision-references
style. Each flag is a field of the command's config (``config.TrainConfig``, ``EvalConfig``,
``FeatureOptions``) and takes its default from there; argparse turns the text into values
(``type=``, ``choices=``) and the config checks them, so a flag means the same as the field does
from Python. Either way a bad flag is a one-line usage error (exit 2). Import-light: the `vfm`
command imports this module to build its parser.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, NoReturn

from vfm.models.errors import UsageError

from .config import (BACKENDS, BATCH_NORMS, MAX_VIEWS, DEFAULT_EPOCHS, DEFAULT_HIDDEN, DEFAULT_LBFGS_CS, DEFAULT_LRS, DEFAULT_MLP_LRS, DEFAULT_PATIENCE, DEFAULT_WEIGHT_DECAYS,
                     HEADS, LOSSES, METRICS, OPTIMIZERS, SCHEDULES, SUBSETS, EvalConfig, FeatureOptions, KNNSettings, TrainConfig, TrainSettings, default_of, flag)
from .values import choice_problem, parse_list, parse_names, parse_number, shown


class _OneLineErrors(argparse.ArgumentParser):
    """A finetune command's parser: a flag argparse cannot parse becomes that command's one-line
    usage error. The dispatcher parses before it catches errors, and argparse's own way out is its
    usage text and ``sys.exit``; so the error is handed to the command, which raises it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, exit_on_error=False)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as exc:
            message = f"{exc.argument_name} {exc.message}" if exc.argument_name else exc.message
            return argparse.Namespace(func=_refusal(message)), []

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # The wording the configs use for a value outside the choices.
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, choice_problem(value, action.choices))


def _refusal(message: str) -> Callable[[argparse.Namespace], int]:
    def refuse(args: argparse.Namespace) -> int:
        raise UsageError(message)

    return refuse


def _parsed_by(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A ``type=`` for argparse, which shows an ArgumentTypeError's words (a ValueError's it replaces)."""
    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse_flag


_INT = _parsed_by(lambda text: parse_number(text, int))
_FLOAT = _parsed_by(lambda text: parse_number(text, float))
_INTS = _parsed_by(lambda text: parse_list(text, int))
_WIDTHS = _parsed_by(lambda text: parse_list(text, int, unique=False))
_FLOATS = _parsed_by(lambda text: parse_list(text, float))
_FRACTIONS = _parsed_by(lambda text: parse_list(text, float, unique=False))
_NAMES = _parsed_by(parse_names)


def _word(text: str) -> str:
    return text.strip().lower()


def _field(group: Any, config: type, name: str, **kwargs: Any) -> None:
    """The flag of ``config``'s field ``name``, with the field's default (None where the field has none:
    the config then says the flag is required, in one line)."""
    group.add_argument(flag(name), dest=name, default=default_of(config, name, otherwise=None), **kwargs)


def _choice(group: Any, config: type, name: str, choices: tuple[str, ...], help: str) -> None:
    _field(group, config, name, type=_word, choices=choices, metavar="|".join(choices), help=help)


def _default(config: type, name: str) -> str:
    return shown(default_of(config, name))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    ft = subparsers.add_parser("finetune", help="train heads on frozen backbone features, evaluate, publish",
                               description="Train k-NN, linear or MLP heads on the frozen features of a zoo "
                                           "backbone; evaluate them; publish them to the service's heads folder.")
    sub = ft.add_subparsers(dest="finetune_command", metavar="COMMAND", required=True, parser_class=_OneLineErrors)
    add_train_arguments(sub.add_parser("train", help="extract features, train heads, write a run folder"))
    add_eval_arguments(sub.add_parser("eval", help="re-evaluate a run's head on data"))
    add_publish_arguments(sub.add_parser("publish", help="copy a run's head into a heads folder"))


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_train)
    T, S = TrainConfig, TrainSettings
    g = p.add_argument_group("what to train")
    _field(g, T, "backbone", metavar="NAME", help="a zoo backbone (`vfm models list --task embed`), "
           "or pixels[:SIZE][:rgb] for a raw-pixel baseline (required)")
    _field(g, T, "data", metavar="SPEC", help="an ImageFolder folder, a .csv manifest (path,label[,split]) or "
           "idx:FOLDER (MNIST-style idx files) (required)")
    _choice(g, T, "head", HEADS, help=f"default {_default(T, 'head')}")
    _field(g, T, "ks", type=_INTS, metavar="K[,K...]", help="knn: neighbours; a list is chosen on validation "
           f"(default {_default(KNNSettings, 'ks')})")
    _choice(g, T, "metric", METRICS, help=f"knn distance (default {_default(KNNSettings, 'metric')})")
    _field(g, T, "hidden", type=_WIDTHS, metavar="W[,W...]",
           help=f"mlp hidden widths (default {shown(DEFAULT_HIDDEN)})")
    _field(g, T, "dropout", type=_FLOAT, metavar="P", help="mlp with sgd: dropout after each hidden layer "
           f"(default {_default(S, 'dropout')})")
    _choice(g, T, "loss", LOSSES, help=f"default {_default(S, 'loss')}; hinge is binary (2 classes)")
    g = p.add_argument_group("optimisation")
    _choice(g, T, "optimizer", OPTIMIZERS, help=f"{_default(S, 'optimizer')} (default); gd: full batch, the step "
            "halved until the loss falls; lbfgs: full batch L-BFGS, one fit per weight decay (see --C), warm-started")
    _field(g, T, "lrs", type=_FLOATS, metavar="LR[,LR...]", help="sgd, gd: one head per rate in one pass, the best "
           f"on validation kept (default sgd {shown(DEFAULT_LRS['sgd'])}, mlp by sgd {shown(DEFAULT_MLP_LRS)}, "
           f"gd {shown(DEFAULT_LRS['gd'])})")
    _field(g, T, "epochs", type=_INT, metavar="N", help="epochs; gd: iterations; lbfgs: iterations per weight decay "
           f"(default sgd {DEFAULT_EPOCHS['sgd']}, gd {DEFAULT_EPOCHS['gd']}, lbfgs {DEFAULT_EPOCHS['lbfgs']})")
    _field(g, T, "batch_size", type=_INT, metavar="B",
           help=f"sgd mini-batch size (default {_default(S, 'batch_size')})")
    _field(g, T, "momentum", type=_FLOAT, metavar="M", help=f"sgd momentum (default {_default(S, 'momentum')})")
    _field(g, T, "nesterov", action="store_true", help="sgd: Nesterov momentum")
    _field(g, T, "weight_decay", type=_FLOATS, metavar="W[,W...]", help="L2 weight decay; a list trains "
           "one head per value (x each --lr) in one pass, the best on validation kept (default sgd, gd "
           f"{shown(DEFAULT_WEIGHT_DECAYS['sgd'])}; lbfgs 1/(N*C) on N training images, C from --C)")
    _field(g, T, "cs", type=_FLOATS, metavar="C[,C...]", help="lbfgs: weight decays 1/(N*C) on N training images, "
           f"scikit-learn's C; a list is one head per C, walked from the strongest as a warm-started path, the best on "
           f"validation kept (default {shown(DEFAULT_LBFGS_CS)}: LogisticRegression's; e.g. 0.01,0.1,1,10)")
    _choice(g, T, "schedule", SCHEDULES, help=f"sgd learning-rate schedule (default {_default(S, 'schedule')})")
    _field(g, T, "step_epochs", type=_INT, metavar="N", help="step schedule: x0.1 every N epochs (default epochs/3)")
    _field(g, T, "patience", type=_INT, metavar="N", help="sgd: stop a head after N epochs without a better "
           f"validation score (default {DEFAULT_PATIENCE['linear']}, mlp {DEFAULT_PATIENCE['mlp']}; 0: off)")
    _field(g, T, "tol", type=_FLOAT, metavar="T", help="gd: stop when the gradient norm is under T; lbfgs: when its "
           f"largest entry is (default {_default(S, 'tol')})")
    g = p.add_argument_group("data")
    _field(g, T, "split", type=_FRACTIONS, metavar="TRAIN,VAL,TEST", help="fractions for the splits the data "
           f"does not give itself (default {_default(T, 'split')})")
    _field(g, T, "seed", type=_INT, metavar="S", help="seeds the splits, initial weights and shuffling "
           f"(default {_default(T, 'seed')})")
    _field(g, T, "limit", type=_INT, metavar="N", help="at most N examples in all, stratified (tests, demos)")
    _field(g, T, "classes", type=_NAMES, metavar="A,B[,...]", help="keep only these classes, e.g. two for hinge")
    g = p.add_argument_group("run")
    _field(g, T, "out", type=Path, metavar="DIR", help="run folder (default runs/<data>-<backbone>-<head>)")
    _field(g, T, "resume", action="store_true", help="continue the interrupted run in --out")
    _field(g, T, "overwrite", action="store_true", help="replace the run in --out")
    _field(g, T, "delta", type=_FLOAT, metavar="D", help="the test-error bound holds with probability 1 - D "
           f"(default {_default(T, 'delta')})")
    g = p.add_argument_group("fine-tuning the backbone (the result is a model: `vfm finetune publish` it)")
    _field(g, T, "unfreeze", type=_INT, metavar="N", help="train the backbone's last N blocks with the head "
           "(sgd, ce); the frozen part's activations are cached unless --augment")
    _field(g, T, "backbone_lr", type=_FLOAT, metavar="LR", help="--unfreeze: the blocks' learning rate "
           "(default: the head's / 10)")
    _field(g, T, "augment", action="store_true", help="--unfreeze: random flips and shifts of the training images "
           "(runs the whole backbone every epoch)")
    _field(g, T, "views", type=_INT, metavar="N", help=f"--unfreeze: N fixed augmented views of each training image "
           f"(flip, then flips and 10%% shifts; at most {MAX_VIEWS}) through the frozen part once, cached; each epoch "
           f"takes one of an image's 1+N versions at random (default {_default(T, 'views')})")
    _field(g, T, "label_smoothing", type=_FLOAT, metavar="E", help="--unfreeze: label smoothing of the ce loss, "
           f"0 <= E < 1 (default {_default(T, 'label_smoothing')})")
    _field(g, T, "head_epochs", type=_INT, metavar="N", help="--unfreeze: first train the head alone for N epochs on "
           "the pre-trained features (computed once), then the blocks with it: linear probing, then fine-tuning "
           f"(default {_default(T, 'head_epochs')})")
    _field(g, T, "mixup", type=_FLOAT, metavar="A", help="--unfreeze: mixup of what the blocks take in (manifold "
           "mixup on the cached activations): each batch is mixed with a shuffled copy of itself, weights from "
           f"Beta(A, A), and so are its labels; 0 turns it off, 0.2-0.4 is usual (default {_default(T, 'mixup')})")
    _choice(g, T, "batch_norm", BATCH_NORMS, help="--unfreeze: the blocks' batch norm keeps the pre-trained "
            f"statistics (frozen) or trains on the batches' (train) (default {_default(T, 'batch_norm')})")
    _field(g, T, "unpooled", type=_INT, metavar="N", help="train the head (linear or mlp) on the activations that "
           "enter the backbone's last N blocks (0: its last block's output), unpooled and flattened; the model is the "
           "backbone cut there plus the head. With --unfreeze M the M blocks before the cut train with the head. Where the classes differ in where things are, this beats pooled features, trained blocks or not "
           "(Fashion-MNIST: README)")
    g = _add_feature_arguments(p)
    _field(g, T, "normalize", action="store_true", help="L2-normalise the backbone's features (recorded in "
           "head.json, so the service does the same)")


def _add_feature_arguments(p: argparse.ArgumentParser) -> Any:
    F = FeatureOptions
    g = p.add_argument_group("features")
    _field(g, F, "device", metavar="DEVICE", help=f"backbone device: {_default(F, 'device')} (default), cpu, cuda "
           "or cuda:N")
    _choice(g, F, "backend", BACKENDS, help=f"extract on {_default(F, 'backend')} (default) or onnx: the "
            "backbone's ONNX export (`vfm export NAME`) on ONNX Runtime")
    _field(g, F, "repository", type=Path, metavar="DIR", help="onnx: the exports' folder (default "
           "$VFM_MODEL_REPOSITORY or ./model_repository)")
    _field(g, F, "workers", type=_INT, metavar="N", help="processes that read and resize images while the backbone "
           "runs (default 1 per 4 cores, at least 1; 0: none)")
    _field(g, F, "cache_dir", type=Path, metavar="DIR", help="feature cache (default $VFM_CACHE/features)")
    _field(g, F, "use_cache", action="store_false", help="neither read nor write the feature cache")
    _field(g, F, "extract_batch_size", type=_INT, metavar="N", help="images per backbone forward pass "
           f"(default {_default(F, 'extract_batch_size')})")
    _field(g, F, "ray_address", metavar="ADDR", help="extract with Ray Data: a cluster address, auto, or local "
           "(start Ray here)")
    _field(g, F, "ray_actors", type=_INT, metavar="N", help="Ray: actors in the pool (default one per GPU, else 2)")
    _field(g, F, "ray_gpus", type=_FLOAT, metavar="G", help="Ray: GPUs per actor (default 1 on a GPU cluster, "
           "else 0)")
    _field(g, F, "threads", type=_INT, metavar="N", help="torch threads for extraction and training (default: "
           "torch's, and 1 to train small heads)")
    _field(g, F, "progress", action="store_false", help="no progress bars")
    return g


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_eval)
    E = EvalConfig
    p.add_argument("run", nargs="?", metavar="RUN", help="a run folder, or any folder with head.json and "
                   "head.safetensors, or a model run's (--unfreeze / --unpooled: model.json and model.safetensors)")
    _field(p, E, "data", metavar="SPEC", help="data spec, as for train (required)")
    _choice(p, E, "subset", SUBSETS, help="test: the data's own test split; all; auto (default): test when the "
            "data has one, else all")
    _field(p, E, "limit", type=_INT, metavar="N", help="at most N examples, stratified")
    _field(p, E, "seed", type=_INT, metavar="S", help=f"seed of the --limit subset (default {_default(E, 'seed')})")
    _field(p, E, "delta", type=_FLOAT, metavar="D", help="the bound holds with probability 1 - D "
           f"(default {_default(E, 'delta')})")
    _field(p, E, "out", type=Path, metavar="DIR", help="report folder (default RUN/eval-<data>)")
    _field(p, E, "update", action="store_true", help="record the new metrics in RUN/head.json (a model run's: model.json), which the service lists "
           "(GET /v1/heads) once published or reloaded; the training's metrics are kept as training_metrics")
    _add_feature_arguments(p)


def add_publish_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_publish)
    p.add_argument("run", nargs="?", metavar="RUN", help="a run folder")
    p.add_argument("--to", metavar="HEADS_DIR", help="the service's heads folder (required); for an --unfreeze "
                   "run, the models folder (default $VFM_MODELS_DIR, else ~/.local/share/vfm/models)")
    p.add_argument("--name", metavar="NAME", help="served as /v1/heads/NAME, or as model NAME for an --unfreeze "
                   "run (default: the run folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace a published head of the same name")


# ---- configs from parsed flags --------------------------------------------------------------

def _values(config: type, args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(config) if f.init and f.name != "features"}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The parsed train flags as the pipeline's ``TrainConfig`` (which checks them)."""
    return TrainConfig(**_values(TrainConfig, args), features=FeatureOptions(**_values(FeatureOptions, args)))


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**_values(EvalConfig, args), features=FeatureOptions(**_values(FeatureOptions, args)))


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
    _use_threads(cfg.features.threads)
    if cfg.unfreeze:  # a model, not a head: finetune/unfreeze.py
        from .unfreeze import unfreeze_run as train_run
    else:
        from .pipeline import train_run
    try:
        summary = train_run(cfg)
    except _known_errors() as exc:
        raise UsageError(str(exc)) from None
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
        print(f" {mark} {h.name:40s} {head_outcome(h)}")
    print(f"chosen on validation: {summary.chosen}; test accuracy {ev.accuracy:.4f}")
    print(ev.bound_sentence())
    print(f"report: {summary.out / 'report.md'}")
    if cfg.unfreeze or cfg.unpooled is not None:
        print(f"a model: `vfm finetune publish {summary.out} --name NAME`, then `vfm predict NAME IMAGE`")
    return 0


def head_outcome(h: Any) -> str:
    """A head's line of the train summary: its scores, or how it diverged."""
    if h.val_accuracy is None:  # diverged before any finite epoch: no scores to show
        remedy = "a larger weight decay (a smaller --C)" if "_lbfgs" in h.name else "a smaller --lr"
        return f"diverged at epoch {len(h.history)} (its loss became infinite; try {remedy})"
    text = f"val {h.val_accuracy:.4f}  test {h.test_accuracy:.4f}"
    if h.stopped == "diverged":
        return f"{text}  (diverged at epoch {len(h.history)}; its best epoch, {h.best_epoch}, is kept)"
    if h.stopped == "collapsed":
        return f"{text}  (collapsed: it answers one class for every validation image; try a smaller --lr or --backbone-lr)"
    return text + (f"  ({h.stopped})" if h.stopped else "")


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = eval_config(args)
    _use_threads(cfg.features.threads)
    from vfm.models.heads import InvalidHead

    from .runs import eval_run

    try:
        result = eval_run(cfg)
    except (InvalidHead, *_known_errors()) as exc:
        raise UsageError(str(exc)) from None
    ev = result.evaluation
    print(f"{cfg.data} ({result.subset}): accuracy {ev.accuracy:.4f} on {ev.k} examples"
          + (f", {result.stats.skipped} unreadable skipped" if result.stats.skipped else ""))
    print(ev.bound_sentence())
    print(f"report: {result.out / 'report.md'}")
    if result.updated is not None:
        print(f"metrics recorded in {result.updated} (reload the service's heads to show them: "
              "POST /v1/admin/heads/reload)")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from vfm.models.heads import InvalidHead

    from .runs import publish

    if args.run and (Path(args.run).expanduser() / "model.json").is_file():  # an --unfreeze run: a model
        from .unfreeze import cmd_publish_model

        return cmd_publish_model(args)
    for name, value in (("RUN", args.run), ("--to", args.to)):
        if not (value or "").strip():  # checked here: argparse's own message is a usage dump, not one line
            raise UsageError(f"{name} is required (see --help)")
    try:
        dest = publish(Path(args.run).expanduser(), Path(args.to).expanduser(), args.name, args.overwrite)
    except (InvalidHead, FileExistsError, ValueError) as exc:  # ValueError: a head name unfit for a URL
        raise UsageError(str(exc)) from None
    print(f"published {args.run} as {dest}")
    return 0

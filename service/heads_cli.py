"""`vfm heads list | predict`: the fine-tuned heads of a heads folder, here or on a server (``--url``).

Here, the heads folder is read as the service reads it (``HeadCatalog``: every ``NAME/head.json`` +
``head.safetensors``, a broken one listed as ``invalid`` with the reason) and a head runs over its
backbone's ``embed`` exactly as the service runs it. With ``--url`` the server's ``GET /v1/heads``
and ``POST /v1/heads/NAME/predict`` answer. `vfm heads predict` reads PATHs and writes answers like
`vfm predict` (folders, globs, ``--jsonl``, ``--csv``, ``--draw``, ...).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_TOP_K = 5


def add_commands(sub: argparse._SubParsersAction) -> None:
    from vfm.models.cli.predict import HEADS_DIR_ENV, add_input_arguments

    heads = sub.add_parser("heads", help="fine-tuned heads: list them, classify images with one")
    hsub = heads.add_subparsers(dest="heads_command", metavar="SUBCOMMAND", required=True)
    folder_help = f"the heads folder (default: ${HEADS_DIR_ENV} or ./heads, as `vfm finetune publish --to` fills it)"
    p = hsub.add_parser("list", help="the heads of a heads folder (or of a server with --url)")
    p.add_argument("--heads-dir", metavar="DIR", help=folder_help)
    p.add_argument("--url", help="list the heads a running vfm server serves")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_heads_list)

    p = hsub.add_parser("predict", help="classify images with a head over its backbone's features")
    p.add_argument("name", help="head name (see `vfm heads list`)")
    add_input_arguments(p)
    p.add_argument("--top-k", type=int, default=None, help=f"how many labels (default {DEFAULT_TOP_K})")
    p.add_argument("--heads-dir", metavar="DIR", help=folder_help)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="the backbone's backend")
    p.add_argument("--repository", metavar="DIR", help="--backend onnx: the model repository of the backbone")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_heads_predict)


def _folder(args: argparse.Namespace) -> Path:
    from vfm.models.cli.predict import heads_dir

    return Path(args.heads_dir).expanduser() if args.heads_dir else heads_dir()


def _check_local_flags(args: argparse.Namespace) -> None:
    from vfm.models.errors import UsageError

    if args.url and args.heads_dir:
        raise UsageError("--heads-dir is the server's (its config's heads_dir); drop it with --url")


def _catalog(args: argparse.Namespace) -> Any:
    from vfm.models.errors import CliError

    from .heads import HeadCatalog

    folder = _folder(args)
    if not folder.is_dir():
        raise CliError(f"no heads folder {folder}: give --heads-dir DIR (or set $VFM_HEADS_DIR); "
                       "`vfm finetune publish RUN --to DIR` puts heads there")
    catalog = HeadCatalog(folder)
    catalog.reload()
    return catalog


def _metric(head: dict[str, Any]) -> str:
    metrics = head.get("metrics") or {}
    shown = [f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith("accuracy") and isinstance(v, (int, float))]
    return " ".join(shown)


def cmd_heads_list(args: argparse.Namespace) -> int:
    _check_local_flags(args)
    if args.url:
        from .client import RemoteCalls

        heads = RemoteCalls(args.url).heads()
    else:
        heads = _catalog(args).list()
    if args.json:
        print(json.dumps(heads, indent=2))
        return 0
    if not heads:
        where = args.url or _folder(args)
        print(f"no heads in {where}", flush=True)
        return 0
    rows = [(h["name"], h["status"], h.get("backbone") or "-", h.get("head_type") or "-",
             f"{len(h['labels'])} labels" if h.get("labels") else "-", h.get("reason") or _metric(h)) for h in heads]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[5])
    return 0


def _local_head_outcomes(args: argparse.Namespace, top_k: int) -> tuple[Any, list[str]]:
    from vfm.models.cli.inputs import expand_inputs
    from vfm.models.cli.local import run_batches
    from vfm.models.cli.predict import load_runner
    from vfm.models.errors import CliError, UsageError
    from vfm.models.registry import UnknownModel, get_spec

    catalog = _catalog(args)
    entry = catalog.get(args.name)
    if entry is None:
        import difflib

        close = difflib.get_close_matches(args.name, catalog.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"no head {args.name!r} in {catalog.folder}.{hint} `vfm heads list` lists them")
    if entry.status != "ready":
        raise CliError(f"head {args.name!r} did not load: {entry.reason}")
    try:
        backbone = get_spec(entry.backbone).name
    except UnknownModel:
        raise CliError(f"head {args.name!r} runs over {entry.backbone!r}, which is not a model of the zoo") from None
    paths = expand_inputs(args.images, args.recursive)
    runner = load_runner(backbone, args.backend, args, None)
    head = entry.head

    def run(images: list[Any], _paths: list[str]) -> list[tuple[dict[str, Any], Any]]:
        features = runner.embed(images, normalize=entry.normalize)
        return [({"head": args.name, "backbone": backbone, **top.to_json()}, None)
                for top in head.classify(features, top_k)]

    return run_batches(paths, args.batch_size or 8, run), paths


def cmd_heads_predict(args: argparse.Namespace) -> int:
    from vfm.models.cli.inputs import Outcome, expand_inputs
    from vfm.models.cli.predict import check_outputs, write_outcomes
    from vfm.models.errors import UsageError

    _check_local_flags(args)
    check_outputs(args, "classify")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    top_k = args.top_k or DEFAULT_TOP_K
    if args.url:
        from .client import RemoteCalls

        if args.repository:
            raise UsageError("--repository is the server's to choose (its config); drop it with --url")
        paths = expand_inputs(args.images, args.recursive)
        answers = RemoteCalls(args.url).head_predict(args.name, paths, {"top_k": top_k}, args.concurrency)
        outcomes = (Outcome(path, result=answer, error=error) for path, answer, error in answers)
        return write_outcomes(outcomes, len(paths), args)
    if args.repository and args.backend != "onnx":
        raise UsageError("--repository holds ONNX exports: it goes with --backend onnx")
    outcomes, paths = _local_head_outcomes(args, top_k)
    return write_outcomes(outcomes, len(paths), args)

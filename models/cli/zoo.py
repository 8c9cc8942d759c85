"""`vfm models list|info` and `vfm weights where|fetch`: answered from registry metadata, without torch."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError
from .options import TASKS


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list and describe the models of the zoo")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    p = msub.add_parser("list", help="list models, optionally filtered by a wildcard (e.g. 'sam_*')",
                        description="One line per model: name, tasks, availability, weights source. Availability: "
                                    "ready (weights on this machine), package (in an installed pip package), "
                                    "download (fetched on first use), install (pip package missing), random (no "
                                    "trained weights).")
    p.add_argument("pattern", nargs="?", help="shell-style wildcard")
    p.add_argument("--task", choices=TASKS, help="only models that can do this task")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("info", help="describe one model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_info)

    weights = sub.add_parser("weights", help="where model weights come from")
    wsub = weights.add_subparsers(dest="weights_command", metavar="SUBCOMMAND", required=True)
    p = wsub.add_parser("where", help="where to put a model's weights for offline use")
    p.add_argument("name")
    p.set_defaults(func=cmd_weights_where)
    p = wsub.add_parser("fetch", help="download a model's weights into the cache now (not with VFM_OFFLINE=1)")
    p.add_argument("name")
    p.set_defaults(func=cmd_weights_fetch)


def spec_or_usage_error(name: str):
    from ..registry import UnknownModel, get_spec

    try:
        return get_spec(name)
    except UnknownModel as exc:
        raise UsageError(str(exc)) from None


def model_json(name: str) -> dict:
    from ..availability import availability
    from ..registry import get_spec

    spec = get_spec(name)
    return {**spec.to_json(), **availability(spec).to_json()}


def cmd_models_list(args: argparse.Namespace) -> int:
    from ..availability import availability
    from ..registry import get_spec, list_models
    from ..weights import describe_source

    names = list_models(args.pattern, task=args.task)
    if args.json:
        print(json.dumps([model_json(n) for n in names], indent=2))
        return 0
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [("NAME", "TASKS", "AVAILABILITY", "WEIGHTS")]
    for name in names:
        spec = get_spec(name)
        source = "random" if spec.random_weights else describe_source(spec.weights) or "-"
        rows.append((name, ",".join(spec.tasks), availability(spec).status, source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, tasks, status, source in rows:
        print(f"{name:<{widths[0]}}  {tasks:<{widths[1]}}  {status:<{widths[2]}}  {source}")
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    spec = spec_or_usage_error(args.name)
    info = model_json(spec.name)
    if spec.labels:
        info["labels_preview"] = list(spec.labels[:10])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_weights_where(args: argparse.Namespace) -> int:
    from ..weights import where_weights

    spec = spec_or_usage_error(args.name)
    print(where_weights(spec.name, spec.weights))
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from ..weights import resolve_weights

    spec = spec_or_usage_error(args.name)
    path = resolve_weights(spec.name, spec.weights)  # WeightsUnavailable says what to do instead
    print(path if path is not None else f"{spec.name} has random weights; nothing to download.")
    return 0

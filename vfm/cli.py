"""The `vfm` command: one small dispatcher over the subcommands each package defines.

Each package has a ``cli.py`` with ``add_commands(subparsers)``; a command sets
``func(args) -> int``. Heavy imports happen inside the commands, so `vfm --help` is fast.
Errors are one line on stderr: exit 2 for usage, 1 for failures.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from vfm.models.errors import UsageError

from . import __version__

COMMAND_MODULES = ("vfm.models.cli", "vfm.models.export.cli", "vfm.service.cli", "vfm.service.heads_cli",
                   "vfm.finetune.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="vfm", description="Vision foundation models: serve, predict, fine-tune.")
    parser.add_argument("--version", action="version", version=f"vfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_commands(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _remote_calls(url: str) -> Any:
    """`vfm predict --url`: the dispatcher sits above models and service, so it joins them here."""
    from vfm.service.client import RemoteCalls

    return RemoteCalls(url)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "url", None):
        args.remote = _remote_calls(args.url)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"vfm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vfm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # every failure is one line; -v shows the traceback
        if args.verbose:
            logging.exception("vfm failed")
        print(f"vfm: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Subcommands of this package (filled in by its issue)."""
from __future__ import annotations


def add_commands(subparsers) -> None:
    return None

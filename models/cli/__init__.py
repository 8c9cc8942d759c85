"""`vfm models`, `vfm weights`, `vfm predict`: the zoo from the command line.

``zoo`` lists and describes models (metadata only, no torch); ``predict`` runs one over files,
folders and globs (``inputs``), here (``local``) or on a server, and writes its answers as text,
JSON, JSONL, CSV, ``.npy`` or pictures (``outputs``, ``vfm.models.draw``).
"""
from __future__ import annotations

import argparse

from . import predict, zoo


def add_commands(sub: argparse._SubParsersAction) -> None:
    zoo.add_commands(sub)
    predict.add_commands(sub)

"""Error types every part of vfm may raise: the CLI reports them as one line.

They live in ``models`` (the package everyone else imports) so that ``models`` never has to
import the ``vfm`` dispatcher, and ``service`` and ``finetune`` never import each other for them.
"""
from __future__ import annotations


class CliError(Exception):
    """A failure to report as one line (exit 1)."""


class UsageError(CliError):
    """Bad arguments found after parsing (exit 2)."""


class WeightsUnavailable(RuntimeError):
    """Weights could not be had. The message names the model, what was tried, what to do."""


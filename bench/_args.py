"""What the benches' command lines share: a parser whose errors are one line (exit 2), as vfm's own."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's own prints the usage first
        self.exit(2, f"{self.prog}: error: {message}\n")

"""Print the pins of every distribution vfm needs at run time, as installed here (the tested set).

    .venv/bin/python deploy/docker/constraints.py > deploy/docker/constraints.txt

The images install with ``-c constraints.txt``, so they run the versions the tests ran. It walks
pyproject's [project.dependencies] (extras included) through the installed metadata; the
Makefile's --no-deps installs are pinned as they are.
"""
from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
NO_DEPS = ("facenet-pytorch",)   # installed with --no-deps by the Makefile and the Dockerfiles


def runtime_pins(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of the requirements and everything they need."""
    pins: dict[str, str] = {}
    extras_done: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        done = extras_done.setdefault(name, set())
        if name in pins and set(req.extras) <= done:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here; run `make install` first") from None
        pins[name] = dist.version.split("+")[0]   # torch 2.14.1+cu130 pins as 2.14.1 (the CPU image takes +cpu)
        done.update(req.extras)
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ["", *done]):
                sub.marker = None
                todo.append(sub)
    return pins


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = runtime_pins(project["dependencies"])
    for name in NO_DEPS:
        pins[canonicalize_name(name)] = distribution(name).version
    sys.stdout.write("# rendered by deploy/docker/constraints.py from pyproject.toml and the tested environment\n")
    sys.stdout.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

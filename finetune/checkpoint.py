"""Training checkpoints: tensors + a JSON state in one safetensors file, replaced atomically.

A checkpoint says which run it belongs to (a digest of settings and data); resuming a run with
other settings is refused rather than silently mixing two trainings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vfm.models.checkpoints import save_state_dict

NAME = "checkpoint.safetensors"


class CheckpointMismatch(ValueError):
    """--resume found a checkpoint of a different run."""


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    save_state_dict(tensors, Path(folder) / NAME, metadata={"state": json.dumps(state)})


def load_checkpoint(folder: Path, run_digest: str) -> Checkpoint | None:
    """The checkpoint in ``folder`` (``None`` if there is none); it must belong to ``run_digest``."""
    path = Path(folder) / NAME
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {}).get("state", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointMismatch(f"{path} cannot be read ({exc}); delete it to start over.") from None
    if state.get("run_digest") != run_digest:
        raise CheckpointMismatch(f"{path} belongs to a run with other settings or data; resume with the same "
                                 "command, or choose another --out to start a new run.")
    return Checkpoint(tensors, state)


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8))

"""PyTorch plumbing shared by the families: device choice, dtypes, moving batches."""
from __future__ import annotations

from typing import Any

import numpy as np


class DeviceUnavailable(RuntimeError):
    """A device was asked for that this machine does not have (e.g. cuda without a GPU)."""


DTYPES = ("float32", "float16", "bfloat16")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` must exist."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device!r} was asked for but this machine has no CUDA GPU "
                                    "visible to PyTorch; use device: cpu or auto.")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {device!r} does not exist; this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s).")
        return device
    raise DeviceUnavailable(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def torch_dtype(name: str | None, device: str) -> Any:
    """fp16/bf16 only make sense on CUDA; on CPU they are refused rather than silently slow."""
    import torch

    name = name or "float32"
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    if name != "float32" and not device.startswith("cuda"):
        raise DeviceUnavailable(f"dtype {name} needs a CUDA device; this model runs on {device}.")
    return getattr(torch, name)


def to_device(batch: np.ndarray, device: str, dtype: Any = None) -> Any:
    """numpy -> torch on ``device``; pinned memory and a non-blocking copy on CUDA."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(batch))
    if device.startswith("cuda"):
        t = t.pin_memory().to(device, non_blocking=True)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t


def set_threads(num_threads: int | None) -> None:
    import torch

    if num_threads:
        torch.set_num_threads(int(num_threads))

"""The PyTorch backend: device choice, dtypes, and ``TorchNetwork``, a module behind the ``Network`` call.

torch is imported inside the functions: importing this module (e.g. to build the CLI's
parser or to list models) costs nothing.
"""
from __future__ import annotations

import importlib
import threading
from typing import Any, Mapping, Sequence

import numpy as np

_IMPORT_LOCK = threading.Lock()


class DeviceUnavailable(RuntimeError):
    """A device was asked for that this machine does not have (e.g. cuda without a GPU)."""


DTYPES = ("float32", "float16", "bfloat16")


def import_torch(module: str = "torch") -> Any:
    """``torch`` or one of its modules, imported under a lock.

    torch is imported lazily (listing models needs none of it), so its first import may happen
    in a worker thread (the service checks its models in a thread pool). Two threads importing
    torch for the first time at once see a partially initialised module; one at a time is safe.
    """
    with _IMPORT_LOCK:
        return importlib.import_module(module)


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


class TorchNetwork:
    """A PyTorch module called with named numpy arrays, returning named numpy arrays (``vfm.models.network``).

    The module is moved to ``device`` and ``dtype`` (pass ``dtype=None`` to leave its
    parameters as they are, e.g. SAM's decoder keeps its prompt encoder in float32). Float
    inputs are cast to ``dtype`` except those named in ``uncast_inputs``, which keep their
    numpy dtype (pixel coordinates, a float64 threshold); a list of arrays
    becomes a list of tensors (torchvision's detectors take images of any sizes that way);
    float outputs come back as float32. ``forward`` takes the inputs in the order of
    ``input_names`` and returns one tensor or a tuple in the order of ``output_names``.
    """

    backend = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str], device: str = "cpu",
                 dtype: Any = None, uncast_inputs: Sequence[str] = ()):
        import torch

        self.device = device
        self.dtype = dtype if dtype is not None else torch.float32
        module = module.eval().to(device=device) if dtype is None else module.eval().to(device=device, dtype=dtype)
        module.requires_grad_(False)
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.uncast_inputs = frozenset(uncast_inputs)

    def tensor(self, name: str, value: np.ndarray | Sequence[np.ndarray]) -> Any:
        """One input as the module takes it: on the device, float in the network's dtype."""
        dtype = None if name in self.uncast_inputs else self.dtype
        if isinstance(value, (list, tuple)):
            return [to_device(np.asarray(v), self.device, dtype) for v in value]
        return to_device(np.asarray(value), self.device, dtype)

    def run(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self.module(*(self.tensor(name, inputs[name]) for name in self.input_names))
        values = result if isinstance(result, (tuple, list)) else (result,)
        named = dict(zip(self.output_names, values, strict=True))
        return {name: _to_numpy(named[name]) for name in (outputs or self.output_names)}

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch.")}


def _to_numpy(tensor: Any) -> np.ndarray:
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.cpu().numpy()

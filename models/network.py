"""The one thing a runner calls: a network that maps named arrays to named arrays.

Two backends implement it: ``backends.torch.TorchNetwork`` (a PyTorch module on a device, in
a dtype, under ``inference_mode``) and ``backends.onnx.OnnxSession`` (an ONNX Runtime session
from an export). A family runner does its own pre- and post-processing in numpy and calls
its network(s) in between, so the same runner class serves both backends and a difference
between them can only come from the network (which an export's parity check bounds).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Network(Protocol):
    """Named numpy inputs in, named numpy outputs out (float outputs as float32)."""

    backend: str                 # "torch" or "onnx"
    output_names: list[str]      # every output, in the network's order

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs named in ``outputs`` (default: all) for one call on ``inputs``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``Runner.info()`` shows about it (e.g. ONNX Runtime's providers)."""
        ...

"""The ONNX Runtime backend: device -> execution providers, session settings, IO binding, sessions.

``OnnxSession`` is the ``Network`` (``vfm.models.network``) a family runner calls when a model
runs from an ONNX export. This module only opens sessions: finding an export, making one
(auto-export) and choosing the runner are ``vfm.models.loading``'s business.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .torch import DeviceUnavailable

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
SESSION_OPTIONS = ("num_threads", "inter_op_threads", "spinning", "tensorrt", "trt_fp16", "io_binding")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_onnx_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when ONNX Runtime has its CUDA provider, else ``cpu``; ``cuda[:N]`` needs that provider."""
    device = (device or "auto").strip().lower()
    has_cuda = CUDA in available_providers()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise DeviceUnavailable(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")
        if not has_cuda:
            raise DeviceUnavailable(f"device {device!r} was asked for but ONNX Runtime has no CUDA provider here "
                                    f"(it has {', '.join(available_providers())}); use device: cpu or auto, or "
                                    "install onnxruntime-gpu on a machine with an NVIDIA GPU (pip install '.[gpu]').")
        return f"cuda:{int(index)}" if ":" in device else "cuda"
    raise DeviceUnavailable(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def device_id(device: str) -> int:
    return int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0


@dataclass(frozen=True)
class SessionSettings:
    """How sessions run. ``num_threads``/``inter_op_threads``: ONNX Runtime's intra/inter-op pools
    (None: its default, one thread per physical core). ``spinning``: pool threads busy-wait for
    the next run (ONNX Runtime's default: lower latency, but they take CPU from the Python and
    torch code between runs, e.g. several replicas on one node); None: what the export recorded
    (``allow_spinning`` in config.json "session"), else on. ``tensorrt``: put TensorRT
    first when it is available (engines go to the local cache). ``io_binding``: None means on CUDA."""

    device: str = "cpu"
    num_threads: int | None = None
    inter_op_threads: int | None = None
    spinning: bool | None = None
    tensorrt: bool = True
    trt_fp16: bool = False
    io_binding: bool | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("num_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        for name in ("tensorrt", "trt_fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.spinning is not None and not isinstance(self.spinning, bool):
            raise ValueError(f"spinning must be true, false or unset, got {self.spinning!r}.")
        if self.io_binding is not None and not isinstance(self.io_binding, bool):
            raise ValueError(f"io_binding must be true, false or unset, got {self.io_binding!r}.")

    @property
    def use_io_binding(self) -> bool:
        return self.device.startswith("cuda") if self.io_binding is None else self.io_binding


def providers_for(settings: SessionSettings) -> list[tuple[str, dict[str, Any]]]:
    """The execution providers for ``settings.device``, best first, only those this build has."""
    available = available_providers()
    wanted: list[tuple[str, dict[str, Any]]] = []
    if settings.device.startswith("cuda"):
        index = device_id(settings.device)
        if settings.tensorrt:
            trt: dict[str, Any] = {"device_id": index, "trt_fp16_enable": settings.trt_fp16}
            if settings.cache_dir is not None:
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(settings.cache_dir))
            wanted.append((TENSORRT, trt))
        wanted.append((CUDA, {"device_id": index}))
    wanted.append((CPU, {}))
    chosen = [(name, opts) for name, opts in wanted if name in available]
    skipped = [name for name, _ in wanted if name not in available]
    if skipped:
        log.info("ONNX Runtime providers not in this build, skipped: %s", ", ".join(skipped))
    return chosen


# What an export's config.json "session" may say (export.optimize.SESSION_DEFAULTS writes it):
# ONNX Runtime's graph optimisation level, execution mode, memory arena and memory pattern, and
# the intra-op threads (null: one per core) when the replica asks for no ``num_threads`` itself,
# and whether pool threads spin (``allow_spinning``) when the replica does not say.
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                       "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def session_options(settings: SessionSettings, recorded: Mapping[str, Any] | None = None) -> Any:
    """``ort.SessionOptions`` from the export's recorded choice, the replica's settings on top.

    Unknown or malformed recorded values are ignored with a warning (an export made by another
    vfm must still open), the defaults being ONNX Runtime's ``ORT_ENABLE_ALL``, sequential, arena on.
    """
    import onnxruntime as ort

    recorded = dict(recorded or {})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    level = OPTIMIZATION_LEVELS.get(str(recorded.get("graph_optimization_level", "all")))
    mode = EXECUTION_MODES.get(str(recorded.get("execution_mode", "sequential")))
    if level is None or mode is None or not hasattr(ort.GraphOptimizationLevel, level):
        log.warning("ignoring the export's session settings %s (unknown level or mode)", recorded)
        level, mode = "ORT_ENABLE_ALL", "ORT_SEQUENTIAL"
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.execution_mode = getattr(ort.ExecutionMode, mode)
    for key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
        if isinstance(recorded.get(key), bool):
            setattr(options, key, recorded[key])
    threads = settings.num_threads or recorded.get("intra_op_threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        options.intra_op_num_threads = threads
    if settings.inter_op_threads:
        options.inter_op_num_threads = settings.inter_op_threads
    spinning = settings.spinning
    if spinning is None:
        spinning = recorded.get("allow_spinning", True)
        if not isinstance(spinning, bool):
            log.warning("ignoring the export's allow_spinning %r (not true or false)", spinning)
            spinning = True
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxSession:
    """One ONNX Runtime session with named outputs; on CUDA, inputs and outputs go through IO binding.

    ``recorded``: the export's config.json "session" (the options chosen by measurement for it).
    """

    backend = "onnx"

    def __init__(self, path: Path, settings: SessionSettings, recorded: Mapping[str, Any] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.settings = settings
        options = session_options(settings, recorded)
        providers = providers_for(settings)
        if settings.cache_dir is not None and any(name == TENSORRT for name, _ in providers):
            settings.cache_dir.mkdir(parents=True, exist_ok=True)
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.providers: list[str] = list(self.session.get_providers())
        if settings.device.startswith("cuda") and CUDA not in self.providers:
            raise DeviceUnavailable(f"ONNX Runtime could not start its CUDA provider for {self.path.name} "
                                    f"(running on {', '.join(self.providers)}); check the CUDA/cuDNN install.")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info("%s: ONNX Runtime providers %s, io_binding=%s", self.path.name, self.providers,
                 settings.use_io_binding)

    def describe(self) -> dict[str, Any]:
        return {"file": self.path.name, "providers": self.providers}

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs or self.output_names)
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        if not self.settings.use_io_binding:
            return dict(zip(names, self.session.run(names, feeds)))
        # One host->device copy per input, outputs allocated by ONNX Runtime on the device and
        # copied back once: no staging copies in between.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        where = "cuda" if self.settings.device.startswith("cuda") else "cpu"
        for name in names:
            binding.bind_output(name, where, device_id(self.settings.device))
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))


def open_sessions(folder: Path, config: dict[str, Any], settings: SessionSettings) -> dict[str, OnnxSession]:
    """One session per graph of the export in ``folder`` (as its config.json lists them), by graph key."""
    version = folder / str(config["version"])
    recorded = config.get("session") if isinstance(config.get("session"), dict) else None
    return {key: OnnxSession(version / graph["file"], settings, recorded) for key, graph in config["graphs"].items()}

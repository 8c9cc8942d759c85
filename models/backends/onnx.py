"""ONNX Runtime plumbing: device -> execution providers, session settings, IO binding, loading runners.

``load_onnx_runner`` is what ``load_model(name, backend="onnx")`` calls. It reads an export
from the model repository (``vfm export NAME`` writes it; see ``vfm.models.export``), makes one
session per graph and returns the family's ONNX runner, which has the same task methods and
gives the same results as the PyTorch runner.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..registry import ModelSpec
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
    torch code between runs, e.g. several replicas on one node). ``tensorrt``: put TensorRT
    first when it is available (engines go to the local cache). ``io_binding``: None means on CUDA."""

    device: str = "cpu"
    num_threads: int | None = None
    inter_op_threads: int | None = None
    spinning: bool = True
    tensorrt: bool = True
    trt_fp16: bool = False
    io_binding: bool | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("num_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        for name in ("spinning", "tensorrt", "trt_fp16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
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


class OnnxSession:
    """One ONNX Runtime session with named outputs; on CUDA, inputs and outputs go through IO binding."""

    def __init__(self, path: Path, settings: SessionSettings):
        import onnxruntime as ort

        self.path = Path(path)
        self.settings = settings
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if settings.num_threads:
            options.intra_op_num_threads = settings.num_threads
        if settings.inter_op_threads:
            options.inter_op_num_threads = settings.inter_op_threads
        if not settings.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
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


@dataclass
class LoadedExport:
    """An export read from the repository: its folder, config.json and one session per graph."""

    folder: Path
    config: dict[str, Any]
    sessions: dict[str, OnnxSession] = field(default_factory=dict)

    @property
    def runtime(self) -> dict[str, Any]:
        return dict(self.config.get("runtime") or {})


class OnnxRunnerMixin:
    """What every ONNX runner adds to its family's runner: ``backend = "onnx"`` and the export in ``info()``."""

    backend = "onnx"
    export: LoadedExport

    def info(self) -> dict[str, Any]:
        out = super().info()  # type: ignore[misc]
        config = self.export.config
        out["onnx"] = {"folder": str(self.export.folder), "opset": config.get("opset"),
                       "exporter": config.get("exporter"), "parity": config.get("parity"),
                       "providers": {key: s.providers for key, s in self.export.sessions.items()}}
        return out


def open_export(folder: Path, config: dict[str, Any], settings: SessionSettings) -> LoadedExport:
    version = folder / str(config["version"])
    sessions = {key: OnnxSession(version / graph["file"], settings) for key, graph in config["graphs"].items()}
    return LoadedExport(folder=folder, config=config, sessions=sessions)


def load_onnx_runner(spec: ModelSpec, device: str = "auto", weights: str | Path | None = None,
                     repository: str | Path | None = None, auto_export: bool = False, **options: Any) -> Any:
    """The ONNX Runtime runner of ``spec`` from ``repository/NAME`` (exported first if ``auto_export``).

    ``repository`` defaults to ``$VFM_MODEL_REPOSITORY`` or ``./model_repository``. ``weights``
    are what an automatic export starts from; an existing export made from other weights is refused.
    ``options``: session settings (``num_threads``, ``inter_op_threads``, ``tensorrt``, ``trt_fp16``,
    ``io_binding``) and the family's runner options (e.g. ``pooling`` for ViTs).
    """
    from ..export import ExportNotFound, ExportStale, export_model, find_export, folder_name
    from ..weights import cache_dir
    from .onnx_runners import build_onnx_runner

    resolved = resolve_onnx_device(device)
    dtype = options.pop("dtype", None)
    if dtype not in (None, "float32"):
        raise ValueError(f"dtype {dtype!r} is a PyTorch backend option; ONNX exports run in float32. "
                         "Use backend: torch for float16/bfloat16.")
    session_options = {k: options.pop(k) for k in SESSION_OPTIONS if k in options}
    # Checked before any export. TensorRT engines are built per machine and GPU, so they go to
    # the local cache rather than into the (possibly shared, read-only) repository.
    settings = SessionSettings(device=resolved, cache_dir=cache_dir() / "tensorrt" / folder_name(spec.name),
                               **session_options)
    try:
        folder, config = find_export(spec.name, repository, weights)
    except (ExportNotFound, ExportStale) as exc:
        if not auto_export:
            raise
        stale = isinstance(exc, ExportStale)
        log.log(logging.WARNING if stale else logging.INFO, "%s: %s; exporting it now (auto_export)", spec.name,
                "the ONNX export is stale" if stale else "no ONNX export in the repository")
        export_model(spec.name, repository, weights=weights, replace=stale)
        folder, config = find_export(spec.name, repository, weights)
    loaded = open_export(folder, config, settings)
    return build_onnx_runner(spec, loaded, resolved, options)

"""``load_model``: choose the backend, build the network(s), hand them to the family's runner.

- ``backend="torch"``: the weights are resolved (``vfm.models.weights``) and the model's
  registered builder makes its PyTorch network(s) and runner.
- ``backend="onnx"``: the export is found in the model repository (``vfm export NAME`` makes
  one; ``auto_export=True`` makes it here when it is missing or stale), one ONNX Runtime
  session is opened per graph, and the family's ``from_export`` makes the same runner over them.

This module sits above the families, the backends and the export code, so none of them has to
import another to make this choice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from .runner import Runner
from .spec import ModelSpec

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]


def load_model(name: str, backend: Backend | None = None, device: str = "auto", weights: str | Path | None = None,
               **options: Any) -> Runner:
    """Build the runner of a registered model.

    ``backend``: None is the model's default (``spec.backends[0]``: torch, or onnx for ONNX-only models).
    ``weights`` overrides the spec's default source (local path, ``hf:...``, ``https://...#sha256=``).
    ``options`` go to the family builder (e.g. ``dtype="float16"`` on CUDA); on ONNX also the
    session settings (``num_threads``, ``inter_op_threads``, ``spinning``, ``tensorrt``,
    ``trt_fp16``, ``io_binding``), ``repository`` and ``auto_export``. A model that has ONNX
    graphs only (``spec.backends == ("onnx",)``) runs on ONNX whatever ``backend`` says.
    """
    from .registry import get_spec

    spec = get_spec(name)
    backend = choose_backend(spec, backend)
    if spec.onnx_graphs:
        runner = load_onnx_graphs(spec, device, weights, **options)
    elif backend == "torch":
        from .families import build_torch_runner

        runner = build_torch_runner(spec, device, weights, **options)
    else:
        runner = load_onnx_runner(spec, device, weights, **options)
    log.info("loaded %s (%s on %s)", name, runner.backend, runner.device)
    return runner


def choose_backend(spec: ModelSpec, backend: str | None) -> Backend:
    """The backend ``spec`` runs on when ``backend`` is asked for (None: the model's default).

    A model whose weights are ONNX graphs has no PyTorch network to fall back on, and configs
    and the CLI ask for ``torch`` by default, so such a model runs on ONNX (logged) rather than fail.
    """
    if backend is None:
        return spec.backends[0]  # type: ignore[return-value]
    if backend not in ("torch", "onnx"):
        raise ValueError(f"Unknown backend {backend!r}; use 'torch' or 'onnx'.")
    if backend not in spec.backends:
        log.info("%s has no %s network; running it on %s", spec.name, backend, spec.backends[0])
        return spec.backends[0]  # type: ignore[return-value]
    return backend  # type: ignore[return-value]


def load_onnx_graphs(spec: ModelSpec, device: str = "auto", weights: str | Path | None = None,
                     **options: Any) -> Runner:
    """The runner of a model whose weights are ONNX graphs (``spec.onnx_graphs``): one session per
    graph file of its weights folder, handed to its builder. ``repository`` and ``auto_export``
    (which the service passes to every ONNX model) do not apply: there is nothing to export."""
    from .backends.onnx import SESSION_OPTIONS, OnnxSession, SessionSettings, resolve_onnx_device
    from .backends.torch import import_torch
    from .weights import WeightsUnavailable, cache_dir, resolve_weights

    import_torch()  # the runners' post-processing uses torch; make its first import one thread at a time
    assert spec.onnx_graphs is not None
    repository, auto_export = options.pop("repository", None), options.pop("auto_export", False)
    dtype, quantize = options.pop("dtype", None), options.pop("quantize", None)
    if dtype not in (None, "float32", "float16") or quantize not in (None, "int8") or (quantize and dtype == "float16"):
        raise ValueError(f"Model {spec.name!r} is ONNX graphs in float32; it takes quantize: int8 or dtype: float16 "
                         "(variants made by `vfm export`), not quantize {quantize!r} with dtype {dtype!r}.")
    variant = quantize or (dtype if dtype == "float16" else None)
    resolved = resolve_onnx_device(device)
    session_options = {k: options.pop(k) for k in SESSION_OPTIONS if k in options}
    settings = SessionSettings(device=resolved, cache_dir=cache_dir() / "tensorrt" / spec.name, **session_options)
    if variant:  # NAME.int8 / NAME.float16 in the repository: the graphs made from the shipped ones and checked
        from .export import ExportNotFound, VariantOptions, export_model, find_export

        try:
            found, config = find_export(spec.name, repository, None, variant=variant)
        except ExportNotFound:
            if not auto_export:
                raise
            export_model(spec.name, repository, weights=weights,
                         variant=VariantOptions(quantize=quantize, dtype=dtype or "float32"))
            found, config = find_export(spec.name, repository, None, variant=variant)
        folder = found / str(config["version"])
        sessions = {key: OnnxSession(folder / file, settings) for key, file in spec.onnx_graphs.items()}
        return spec.builder(spec, sessions, folder, resolved, **options)
    folder = resolve_weights(spec.name, spec.weights, weights)
    if folder is None or not Path(folder).is_dir():
        raise WeightsUnavailable(f"Weights for model {spec.name!r} are a folder holding "
                                 f"{', '.join(spec.onnx_graphs.values())}; got {folder}.")
    missing = [file for file in spec.onnx_graphs.values() if not (Path(folder) / file).is_file()]
    if missing:
        raise WeightsUnavailable(f"Weights for model {spec.name!r}: the folder {folder} has no {', '.join(missing)}.")
    sessions = {key: OnnxSession(Path(folder) / file, settings) for key, file in spec.onnx_graphs.items()}
    return spec.builder(spec, sessions, Path(folder), resolved, **options)


def load_onnx_runner(spec: ModelSpec, device: str = "auto", weights: str | Path | None = None,
                     repository: str | Path | None = None, auto_export: bool = False, **options: Any) -> Runner:
    """The ONNX Runtime runner of ``spec`` from ``repository/NAME`` (exported first if ``auto_export``).

    ``repository`` defaults to ``$VFM_MODEL_REPOSITORY`` or ``./model_repository``. ``quantize="int8"``
    or ``dtype="float16"`` run the ``NAME.int8`` / ``NAME.float16`` export (``vfm export --quantize int8``).
    ``weights`` are what an automatic export starts from; an existing export made from other weights
    is refused.
    """
    from .backends.onnx import SESSION_OPTIONS, SessionSettings, open_sessions, resolve_onnx_device
    from .backends.torch import import_torch
    from .export import ExportNotFound, ExportStale, VariantOptions, export_model, find_export, folder_name
    from .families import ONNX_RUNNERS
    from .weights import cache_dir

    import_torch()  # the runners' post-processing uses torch; make its first import one thread at a time
    resolved = resolve_onnx_device(device)
    dtype, quantize = options.pop("dtype", None), options.pop("quantize", None)
    if dtype not in (None, "float32", "float16"):
        raise ValueError(f"dtype {dtype!r} is a PyTorch backend option; ONNX exports run in float32, float16 "
                         "(`vfm export NAME --dtype float16`) or int8 (quantize: int8). Use backend: torch for it.")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize {quantize!r} is not known; the ONNX backend takes quantize: int8.")
    if quantize and dtype not in (None, "float32"):
        raise ValueError("give quantize: int8 or dtype: float16, not both.")
    variant = quantize or (dtype if dtype == "float16" else None)
    session_options = {k: options.pop(k) for k in SESSION_OPTIONS if k in options}
    # Checked before any export. TensorRT engines are built per machine and GPU, so they go to
    # the local cache rather than into the (possibly shared, read-only) repository.
    settings = SessionSettings(device=resolved, cache_dir=cache_dir() / "tensorrt" / folder_name(spec.name),
                               **session_options)
    try:
        folder, config = find_export(spec.name, repository, weights, variant=variant)
    except (ExportNotFound, ExportStale) as exc:
        if not auto_export:
            raise
        stale = isinstance(exc, ExportStale)
        log.log(logging.WARNING if stale else logging.INFO, "%s: %s; exporting it now (auto_export)", spec.name,
                "the ONNX export is stale" if stale else "no ONNX export in the repository")
        options_made = VariantOptions(quantize=quantize, dtype=dtype or "float32") if variant else None
        export_model(spec.name, repository, weights=weights, replace=stale, variant=options_made)
        folder, config = find_export(spec.name, repository, weights, variant=variant)
    kind = config.get("kind")
    if kind not in ONNX_RUNNERS:
        raise ValueError(f"{folder}/config.json names runner kind {kind!r}, which this vfm does not know; "
                         f"re-export with `vfm export {spec.name}`.")
    sessions = open_sessions(folder, config, settings)
    return ONNX_RUNNERS[kind](spec, sessions, config, folder, resolved, **options)

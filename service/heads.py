"""Fine-tuned heads served next to their backbone: the catalog of the heads folder.

A head is a folder ``<heads_dir>/<name>/`` holding ``head.json`` + ``head.safetensors``
(``vfm finetune`` writes them; ``vfm.models.heads`` defines the format). The catalog loads every
such folder with one loader function, the seam between the service and the artifact format:
``loader(folder) -> (head, meta)`` where ``head.classify(features, top_k)`` returns
``Classification`` objects and ``meta`` is head.json. A folder that fails to load is listed
with status ``invalid`` and the loader's reason, never served half-loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

HeadLoader = Callable[[Path], tuple[Any, dict[str, Any]]]


def load_head_folder(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The default loader: the artifact format of ``vfm.models.heads``."""
    from vfm.models.heads import load_head

    return load_head(folder)


@dataclass
class HeadEntry:
    name: str
    folder: Path
    status: str                      # ready | invalid
    reason: str | None = None
    head: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> str | None:
        return self.meta.get("backbone")

    @property
    def normalize(self) -> bool:
        return bool(self.meta.get("embed", {}).get("normalize", False))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "backbone": self.backbone}
        if self.reason:
            out["reason"] = self.reason
        if self.meta:
            out.update(head_type=self.meta.get("head", {}).get("type"), labels=self.meta.get("labels"),
                       feature_dim=self.meta.get("feature_dim"), metrics=self.meta.get("metrics"))
        return out


class HeadCatalog:
    """Every head in ``folder``, loaded by ``loader``; ``reload()`` rescans."""

    def __init__(self, folder: str | Path, loader: HeadLoader = load_head_folder):
        self.folder = Path(folder)
        self.loader = loader
        self._entries: dict[str, HeadEntry] = {}

    def reload(self) -> dict[str, Any]:
        entries: dict[str, HeadEntry] = {}
        if self.folder.is_dir():
            root = self.folder.resolve()
            for head_json in sorted(self.folder.glob("*/head.json")):
                folder = head_json.parent
                try:
                    if folder.resolve().parent != root:
                        raise ValueError(f"{folder} is a symlink leading out of {self.folder} (to "
                                         f"{folder.resolve()}); refused.")
                    head, meta = self.loader(folder)
                    entries[folder.name] = HeadEntry(folder.name, folder, "ready", head=head, meta=meta)
                except Exception as exc:  # any broken artifact is reported, the others still load
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    log.warning("head %s not loaded: %s", folder, reason)
                    entries[folder.name] = HeadEntry(folder.name, folder, "invalid", reason=reason)
        self._entries = entries
        return {"folder": str(self.folder), "loaded": sum(e.status == "ready" for e in entries.values()),
                "invalid": sum(e.status != "ready" for e in entries.values()),
                "heads": [e.to_json() for e in entries.values()]}

    def list(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self._entries.values()]

    def get(self, name: str) -> HeadEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return list(self._entries)

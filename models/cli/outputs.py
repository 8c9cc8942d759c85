"""Where `vfm predict`'s answers go: text, ``--json``, ``--jsonl``, ``--csv FILE``, ``--npy FILE``, ``--draw DIR``.

Every sink takes the outcomes one by one, in input order, as they complete (``write``), and
finishes in ``close``. Failed inputs are reported on stderr by the caller; the JSON sinks also
carry them (``{"image": PATH, "error": "..."}``) so their lines stay aligned with the inputs.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import UsageError
from .inputs import Outcome, read_image

Emit = Callable[[str], None]  # writes one line to stdout (through the progress bar when there is one)


def result_kind(result: dict[str, Any]) -> str:
    if "embedding" in result:
        return "embed"
    if "detections" in result:
        return "detect-segment" if any("masks" in d for d in result["detections"]) else "detect"
    if "predictions" in result:
        return "classify"
    return "segment"


def json_record(outcome: Outcome) -> dict[str, Any]:
    if outcome.ok:
        return {"image": outcome.path, **outcome.result}
    return {"image": outcome.path, "error": outcome.error}


class Sink:
    def write(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def summary(self) -> str | None:
        """What the sink wrote to a file, said on stderr at the end (None: nothing to say)."""
        return None


class TextSink(Sink):
    """The human-readable default."""

    def __init__(self, emit: Emit):
        self.emit = emit

    def write(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.emit("\n".join(human_lines(outcome.path, outcome.result)))


class JsonSink(Sink):
    """``--json``: one JSON list, printed at the end."""

    def __init__(self, emit: Emit):
        self.emit = emit
        self.records: list[dict[str, Any]] = []

    def write(self, outcome: Outcome) -> None:
        self.records.append(json_record(outcome))

    def close(self) -> None:
        self.emit(json.dumps(self.records, indent=2))


class JsonlSink(Sink):
    """``--jsonl``: one JSON object per input, written (and flushed) as soon as it is answered."""

    def __init__(self, emit: Emit):
        self.emit = emit

    def write(self, outcome: Outcome) -> None:
        self.emit(json.dumps(json_record(outcome), separators=(",", ":")))


def _open_text(target: str) -> tuple[TextIO, bool]:
    if target == "-":
        return sys.stdout, False
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"--csv {target} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", newline="", encoding="utf-8"), True


CSV_COLUMNS = {
    "classify": ["path", "rank", "label", "index", "score"],
    "detect": ["path", "detection", "label", "index", "score", "x0", "y0", "x1", "y1"],
    "segment": ["path", "mask", "score", "area", "x0", "y0", "x1", "y1", "png"],
    "detect-segment": ["path", "detection", "label", "score", "x0", "y0", "x1", "y1", "mask", "mask_score", "area",
                       "png"],
}


def csv_rows(path: str, result: dict[str, Any]) -> list[list[Any]]:
    """The CSV rows of one answer: one per label, box, mask, or (embed) one with every feature."""
    kind = result_kind(result)
    if kind == "classify":
        return [[path, rank, p["label"], p.get("index", ""), p["score"]]
                for rank, p in enumerate(result["predictions"], 1)]
    if kind == "detect":
        return [[path, i, d["label"], d.get("index", ""), d["score"], *d["box"]]
                for i, d in enumerate(result["detections"])]
    if kind == "detect-segment":
        return [[path, i, d["label"], d["score"], *d["box"], j, m["score"], m["area"], m.get("png", "")]
                for i, d in enumerate(result["detections"]) for j, m in enumerate(d.get("masks", []))]
    if kind == "embed":
        return [[path, *result["embedding"]]]
    return [[path, i, m["score"], m["area"], *m["bbox"], m.get("png", "") if isinstance(m.get("png"), str)
             and len(m["png"]) < 4096 else ""] for i, m in enumerate(result["masks"])]


class CsvSink(Sink):
    """``--csv FILE`` (``-``: stdout): a table whose columns depend on the task (``CSV_COLUMNS``;
    embed: ``path, f0 .. f{D-1}``). Rows follow the input order; an input without an answer has none."""

    def __init__(self, target: str):
        self.target = target
        self.file, self.owned = _open_text(target)
        self.writer = csv.writer(self.file)
        self.header = False
        self.rows = 0

    def write(self, outcome: Outcome) -> None:
        if not outcome.ok:
            return
        if not self.header:
            kind = result_kind(outcome.result)
            columns = (["path", *(f"f{i}" for i in range(len(outcome.result["embedding"])))] if kind == "embed"
                       else CSV_COLUMNS[kind])
            self.writer.writerow(columns)
            self.header = True
        rows = csv_rows(outcome.path, outcome.result)
        self.writer.writerows(rows)
        self.rows += len(rows)
        self.file.flush()

    def close(self) -> None:
        if self.owned:
            self.file.close()

    def summary(self) -> str | None:
        return f"wrote {self.rows} rows to {self.target}" if self.owned else None


def npy_paths_file(target: str | Path) -> Path:
    """``emb.npy`` -> ``emb.paths.txt``: the image of each row of the array, one path a line."""
    return Path(target).with_suffix(".paths.txt")


class NpySink(Sink):
    """``--npy FILE``: the embeddings as one float32 N x D array (rows in input order, failed inputs
    left out) and ``npy_paths_file(FILE)`` beside it naming the image of each row."""

    def __init__(self, target: str):
        self.target = Path(target)
        if self.target.is_dir():
            raise UsageError(f"--npy {target} is a folder; give a file name")
        self.rows: list[Any] = []
        self.paths: list[str] = []

    def write(self, outcome: Outcome) -> None:
        import numpy as np

        if not outcome.ok:
            return
        vector = outcome.vector if outcome.vector is not None else outcome.result["embedding"]
        self.rows.append(np.asarray(vector, np.float32))
        self.paths.append(outcome.path)

    def close(self) -> None:
        import numpy as np

        array = np.stack(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        with self.target.open("wb") as f:  # np.save(path) would add .npy to any other name
            np.save(f, array)
        npy_paths_file(self.target).write_text("".join(p + "\n" for p in self.paths), encoding="utf-8")

    def summary(self) -> str | None:
        return (f"wrote {len(self.rows)} embeddings to {self.target} (their images, in row order: "
                f"{npy_paths_file(self.target)})")


class DrawSink(Sink):
    """``--draw DIR``: one PNG per answered input, the answer drawn on it (``vfm.models.draw``);
    its path goes into the answer as ``drawn``. Names are the input's stem, made unique."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--draw {folder} is a file; give a folder")
        self.taken: set[str] = set()
        self.count = 0

    def write(self, outcome: Outcome) -> None:
        from ..draw import draw_answer, drawn_name

        if not outcome.ok:
            return
        image = outcome.image if outcome.image is not None else read_image(outcome.path)
        picture = draw_answer(image, outcome.result)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / drawn_name(outcome.path, self.taken)
        picture.save(target)
        outcome.result["drawn"] = str(target)
        self.count += 1

    def summary(self) -> str | None:
        return f"drew {self.count} images into {self.folder}"


# ---- text --------------------------------------------------------------------------------------

def human_lines(path: str, result: dict[str, Any]) -> list[str]:
    lines = [path]
    kind = result_kind(result)
    if kind == "classify":
        lines += [f"  {p['score']:.4f}  {p['label']}" for p in result["predictions"]]
    elif kind in ("detect", "detect-segment"):
        if not result["detections"]:
            lines.append("  no detections")
        for d in result["detections"]:
            lines.append(f"  {d['score']:.4f}  {d['label']:<12} box={d['box']}")
            lines += [f"    mask score={m['score']:.4f} area={m['area']} bbox={m['bbox']} -> {m.get('png', '(rle)')}"
                      for m in d.get("masks", [])]
    elif kind == "embed":
        v = result["embedding"]
        lines.append(f"  dim={result['dim']} [{', '.join(f'{x:.4f}' for x in v[:6])}{', ...' if len(v) > 6 else ''}]")
    else:
        if not result["masks"]:
            lines.append("  no masks")
        lines += [f"  score={m['score']:.4f} area={m['area']} bbox={m['bbox']} -> {m.get('png', '(rle)')}"
                  for m in result["masks"]]
    if result.get("drawn"):
        lines.append(f"  drawn -> {result['drawn']}")
    return lines

"""Labelled images for fine-tuning: ImageFolder folders, CSV manifests, MNIST-style idx files.

A data spec is a folder (ImageFolder: one sub-folder per class, optionally under
train/ val/ test/), a ``.csv`` manifest (``path,label[,split]``, paths relative to the CSV) or
``idx:FOLDER`` (``train-images-idx3-ubyte[.gz]`` + labels, and ``t10k-*``/``test-*`` for the test
split). Readers only list images and labels; pixels are read later, one image at a time, by the
feature extractor, so an unreadable file costs one skipped example, never the run.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from vfm.models.images import as_rgb_array, decode_image

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "testing": 2}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


class DataError(ValueError):
    """The data cannot be used as given; the message says where and what to fix."""


class ImageSource(ABC):
    """Images by index, read on demand."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """HxWx3 uint8 RGB; raises ``InvalidImage`` or ``OSError`` for an unreadable image."""

    @abstractmethod
    def item_key(self, index: int) -> str:
        """A string that changes whenever the image's pixels may have changed (feature cache key)."""

    @abstractmethod
    def describe(self, index: int) -> str:
        """How to name the image to a person (a path, or file#index)."""

    @abstractmethod
    def subset(self, indices: np.ndarray) -> ImageSource: ...


class FileImages(ImageSource):
    """Image files. Keys are path, size and modification time: the `make` test, no re-reading."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return decode_image(self.paths[index].read_bytes())

    def item_key(self, index: int) -> str:
        path = self.paths[index]
        try:
            st = path.stat()
        except OSError:
            return f"missing:{path.resolve()}"
        return f"file:{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def subset(self, indices: np.ndarray) -> FileImages:
        return FileImages([self.paths[i] for i in indices])


class ArrayImages(ImageSource):
    """Images already in memory (idx files): keys are digests of the pixels themselves."""

    def __init__(self, pixels: np.ndarray, names: Sequence[str]):
        self.pixels = pixels          # [N, H, W] or [N, H, W, C] uint8
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, index: int) -> np.ndarray:
        return as_rgb_array(self.pixels[index])

    def item_key(self, index: int) -> str:
        img = np.ascontiguousarray(self.pixels[index])
        return f"pixels:{img.shape}:{hashlib.sha256(img.tobytes()).hexdigest()}"

    def describe(self, index: int) -> str:
        return self.names[index]

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.pixels[indices], [self.names[i] for i in indices])


@dataclass
class LabeledImages:
    """Images, their class indices, the class names, and the split the data itself gives (if any)."""

    spec: str
    source: ImageSource
    labels: np.ndarray                    # int64 [N], indices into classes
    classes: tuple[str, ...]
    given_split: np.ndarray | None = None  # int8 [N]: 0 train, 1 val, 2 test; None: split by fractions

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> LabeledImages:
        indices = np.asarray(indices, dtype=np.int64)
        split = None if self.given_split is None else self.given_split[indices]
        return replace(self, source=self.source.subset(indices), labels=self.labels[indices], given_split=split)

    def given_splits(self) -> set[str]:
        return set() if self.given_split is None else {SPLITS[s] for s in np.unique(self.given_split)}

    def select_classes(self, names: Sequence[str]) -> LabeledImages:
        """Keep only ``names`` (in that order): e.g. two classes for a binary hinge head."""
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise DataError(f"{self.spec}: no class {unknown[0]!r}; the classes are: {', '.join(self.classes)}.")
        old = [self.classes.index(n) for n in names]
        keep = np.flatnonzero(np.isin(self.labels, old))
        out = self.subset(keep)
        remap = {o: i for i, o in enumerate(old)}
        out.labels = np.array([remap[int(v)] for v in out.labels], dtype=np.int64)
        out.classes = tuple(names)
        return out


def open_dataset(spec: str) -> LabeledImages:
    """Read a data spec: a folder, a ``.csv`` manifest or ``idx:FOLDER``."""
    if spec.startswith("idx:"):
        return read_idx_folder(Path(spec[4:]).expanduser(), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder (give a folder, a .csv manifest or idx:FOLDER).")
    if path.is_dir():
        return read_image_folder(path, spec)
    if path.suffix.lower() == ".csv":
        return read_csv_manifest(path, spec)
    raise DataError(f"--data {spec}: not a folder, a .csv manifest or idx:FOLDER.")


# ---- ImageFolder -------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(root: Path, spec: str | None = None) -> LabeledImages:
    """One folder per class (torchvision's ImageFolder), or train/ [val/] test/ each holding those."""
    spec = spec or str(root)
    subdirs = {p.name.lower(): p for p in _class_dirs(root)}
    split_dirs = {name: p for name, p in subdirs.items() if name in _SPLIT_NAMES}
    if "train" in split_dirs and len(split_dirs) >= 2 and len(split_dirs) == len(subdirs):
        parts = [(_SPLIT_NAMES[name], p) for name, p in sorted(split_dirs.items(), key=lambda kv: _SPLIT_NAMES[kv[0]])]
    else:
        parts = [(-1, root)]
    per_part: list[tuple[int, dict[str, list[Path]]]] = []
    for split, folder in parts:
        dirs = _class_dirs(folder)
        if not dirs:
            raise DataError(f"{folder}: no class folders; an ImageFolder holds one sub-folder of images per class.")
        files = {d.name: _image_files(d) for d in dirs}
        for name, listed in files.items():
            if not listed:
                raise DataError(f"class {name!r} ({folder / name}) has no images "
                                f"(looked for {', '.join(IMAGE_EXTENSIONS)}); remove the folder or add images.")
        per_part.append((split, files))
    classes = sorted({name for _, files in per_part for name in files})
    _check_train_has_every_class(spec, [(SPLITS[s] if s >= 0 else "train", set(f)) for s, f in per_part])
    paths, labels, splits = [], [], []
    for split, files in per_part:
        for name, listed in files.items():
            paths += listed
            labels += [classes.index(name)] * len(listed)
            splits += [split] * len(listed)
    given = None if parts[0][0] == -1 else np.asarray(splits, np.int8)
    return LabeledImages(spec, FileImages(paths), np.asarray(labels, np.int64), tuple(classes), given)


def _check_train_has_every_class(spec: str, parts: list[tuple[str, set[str]]]) -> None:
    train = set().union(*[names for split, names in parts if split == "train"])
    for split, names in parts:
        missing = sorted(names - train)
        if missing:
            raise DataError(f"{spec}: label {missing[0]!r} appears in the {split} split but never in train; "
                            "a head cannot learn a class it has not seen.")


# ---- CSV manifest ------------------------------------------------------------------------

def read_csv_manifest(path: Path, spec: str | None = None) -> LabeledImages:
    """``path,label[,split]`` with a header row; relative paths are relative to the CSV's folder."""
    spec = spec or str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc}).") from None
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "path" not in fields or "label" not in fields:
        raise DataError(f"{path}: a manifest needs a header with columns path,label[,split] "
                        f"(found: {','.join(fields) or 'nothing'}).")
    reader.fieldnames = fields
    has_split = "split" in fields
    paths, names, splits = [], [], []
    for line, row in enumerate(reader, start=2):
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not file or not label:
            raise DataError(f"{path}, line {line}: both path and label are needed.")
        p = Path(file).expanduser()
        paths.append(p if p.is_absolute() else path.parent / p)
        names.append(label)
        if has_split:
            value = (row.get("split") or "").strip().lower()
            if value not in _SPLIT_NAMES:
                raise DataError(f"{path}, line {line}: split is {value!r}; use train, val or test.")
            splits.append(_SPLIT_NAMES[value])
    if not paths:
        raise DataError(f"{path}: the manifest lists no images.")
    classes = sorted(set(names))
    split_arr = np.asarray(splits, np.int8) if has_split else None
    if split_arr is not None:
        _check_train_has_every_class(spec, [(SPLITS[s], {n for n, t in zip(names, splits) if t == s})
                                            for s in np.unique(split_arr)])
    labels = np.asarray([classes.index(n) for n in names], np.int64)
    return LabeledImages(spec, FileImages(paths), labels, tuple(classes), split_arr)


# ---- MNIST-style idx ---------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"^(?P<prefix>.+?)[-.](?P<kind>images|labels)[-.]idx(?P<ndim>\d)[-.]ubyte(?:\.gz)?$")


def read_idx_file(path: Path) -> np.ndarray:
    """One idx file (gzipped or not) as a numpy array; a damaged file is a ``DataError``."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}).") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic number).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: idx header is truncated.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes of data) but the file has "
                        f"{len(data) - header}; the file is truncated or damaged.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx_folder(folder: Path, spec: str | None = None) -> LabeledImages:
    """``train-*`` (and ``t10k-*``/``test-*``) image + label files; class names from classes.txt,
    Fashion-MNIST's names for a folder called *fashion*, else the label numbers."""
    spec = spec or f"idx:{folder}"
    if not folder.is_dir():
        raise DataError(f"--data {spec}: {folder} is not a folder of idx files.")
    pairs: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _IDX_NAME.match(p.name)
        if m:
            pairs.setdefault(m["prefix"], {})[m["kind"]] = p
    pairs = {k: v for k, v in pairs.items() if len(v) == 2}
    if not pairs:
        raise DataError(f"{folder}: no idx image/label pairs (expected names like train-images-idx3-ubyte.gz "
                        "and train-labels-idx1-ubyte.gz).")
    prefixes = sorted(pairs, key=lambda k: (0 if k == "train" else 2 if k in ("t10k", "test") else 1, k))
    if len(prefixes) > 1 and not set(prefixes) <= {"train", "t10k", "test"}:
        raise DataError(f"{folder}: idx pairs {', '.join(prefixes)}; use train-* and t10k-* (or test-*).")
    images, labels, splits, names = [], [], [], []
    for prefix in prefixes:
        imgs = read_idx_file(pairs[prefix]["images"])
        labs = read_idx_file(pairs[prefix]["labels"])
        if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[3] not in (1, 3)):
            raise DataError(f"{pairs[prefix]['images']}: expected uint8 images [N, H, W(, 1|3)], "
                            f"got {imgs.dtype} {imgs.shape}.")
        if labs.ndim != 1 or labs.dtype.kind not in "iu" or len(labs) != len(imgs):
            raise DataError(f"{pairs[prefix]['labels']}: expected {len(imgs)} integer labels, got {labs.dtype} "
                            f"{labs.shape}.")
        images.append(imgs)
        labels.append(labs.astype(np.int64))
        split = -1 if len(prefixes) == 1 else (0 if prefix == "train" else 2)
        splits.append(np.full(len(labs), split, np.int8))
        names += [f"{pairs[prefix]['images'].name}#{i}" for i in range(len(imgs))]
    if len({im.shape[1:] for im in images}) > 1:
        raise DataError(f"{folder}: train and test images have different shapes.")
    values = np.concatenate(labels)
    uniq = np.unique(values)
    class_names = _idx_class_names(folder, uniq)
    split_arr = np.concatenate(splits)
    if len(prefixes) > 1:
        _check_train_has_every_class(spec, [(SPLITS[s], {class_names[int(np.searchsorted(uniq, v))]
                                                         for v in np.unique(values[split_arr == s])})
                                            for s in np.unique(split_arr)])
    return LabeledImages(spec, ArrayImages(np.concatenate(images), names),
                         np.searchsorted(uniq, values).astype(np.int64), tuple(class_names),
                         split_arr if len(prefixes) > 1 else None)


def _idx_class_names(folder: Path, values: np.ndarray) -> list[str]:
    listed = folder / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) <= int(values.max()):
            raise DataError(f"{listed} names {len(names)} classes but the labels go up to {int(values.max())}.")
        return [names[int(v)] for v in values]
    if "fashion" in folder.name.lower() and int(values.max()) < len(FASHION_MNIST_CLASSES) and values.min() >= 0:
        return [FASHION_MNIST_CLASSES[int(v)] for v in values]
    return [str(int(v)) for v in values]

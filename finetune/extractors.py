"""What turns an image into a feature vector: a zoo backbone's ``embed``, or raw pixels.

``pixels[:SIZE][:rgb]`` is a baseline, not a model: the image resized to SIZE x SIZE (default
28), grey unless ``rgb``, flattened and scaled to [0, 1]. It answers "do the backbone's features
beat the pixels themselves?" and is never served.
"""
from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when the way features are made changes, to invalidate every cache


class BackboneError(ValueError):
    """A --backbone that cannot make features."""


class Extractor(ABC):
    name: str
    feature_dim: int
    images_embedded: int = 0  # images this object has run through embed(); 0 after a fully cached run

    @abstractmethod
    def key(self) -> dict[str, Any]:
        """Everything that changes the features (the feature cache key)."""

    @abstractmethod
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [N, feature_dim]."""

    @abstractmethod
    def head_meta(self) -> dict[str, Any]:
        """What head.json records so a server makes the same features: backbone, embed, preprocess."""

    # The split the extraction pipeline uses (``loader``): ``prepare`` runs in DataLoader workers
    # and needs no network; ``embed_prepared`` runs here. ``embed`` = ``embed_prepared(prepare(...))``.
    def prepare(self, images: Sequence[np.ndarray]) -> Any:
        """The per-image work that needs no network (default: none)."""
        return list(images)

    def join_prepared(self, parts: list[Any]) -> Any:
        """``prepare`` of several lists of images as ``prepare`` of them all would be."""
        return [im for part in parts for im in part]

    def embed_prepared(self, prepared: Any) -> np.ndarray:
        """float32 [N, feature_dim] of what ``prepare`` made."""
        return self.embed(prepared)


class PixelExtractor(Extractor):
    def __init__(self, size: int = 28, rgb: bool = False):
        self.size, self.rgb = int(size), bool(rgb)
        self.name = f"pixels:{self.size}" + (":rgb" if self.rgb else "")
        self.feature_dim = self.size * self.size * (3 if self.rgb else 1)

    def key(self) -> dict[str, Any]:
        return {"backbone": "pixels", "size": self.size, "rgb": self.rgb, "version": FEATURES_VERSION}

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.embed_prepared(self.prepare(images))

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from PIL import Image

        rows = []
        for im in images:
            pil = Image.fromarray(np.asarray(im, np.uint8)).convert("RGB" if self.rgb else "L")
            if pil.size != (self.size, self.size):
                pil = pil.resize((self.size, self.size), Image.BILINEAR)
            rows.append(np.asarray(pil, np.float32).reshape(-1) / 255.0)
        return np.stack(rows) if rows else np.zeros((0, self.feature_dim), np.float32)

    def join_prepared(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, self.feature_dim), np.float32)

    def embed_prepared(self, prepared: np.ndarray) -> np.ndarray:
        self.images_embedded += len(prepared)
        return prepared

    def head_meta(self) -> dict[str, Any]:
        return {"backbone": self.name, "embed": {"normalize": False},
                "preprocess": {"resize": [self.size, self.size], "mode": "RGB" if self.rgb else "L",
                               "scale": "1/255", "flatten": True}}


class BackboneExtractor(Extractor):
    """A zoo model's ``runner.embed(images, normalize)``; the model loads on first use only, so a
    run whose features are all cached never builds it.

    Classification backbones (``features`` is an output of their network) split the work: workers
    resize (``prepare``), and here one call of the network on the batch, channels-last on PyTorch
    (about 1.5x faster on CPU than NCHW for these CNNs), or the ONNX export with ``backend="onnx"``.
    Other backbones (ViTs, DINOv2) run ``runner.embed`` on the decoded images.
    """

    def __init__(self, name: str, device: str = "auto", normalize: bool = False, weights: str | None = None,
                 backend: str = "torch", repository: str | Path | None = None):
        from vfm.models import get_spec

        self.spec = get_spec(name)
        if not self.spec.is_backbone or "embed" not in self.spec.tasks:
            from vfm.models import list_models

            usable = [m for m in list_models(task="embed") if get_spec(m).is_backbone]
            raise BackboneError(f"model {name!r} cannot be a backbone (it has no feature vector); "
                                f"backbones: {', '.join(usable)}.")
        self.name = name
        self.feature_dim = int(self.spec.feature_dim or 0)
        self.device = device
        self.normalize = bool(normalize)
        self.weights = weights
        self.backend = backend
        self.repository = repository
        self._runner: Any = None
        self._key: dict[str, Any] | None = None
        self._split = self.spec.family == "classification" and self.spec.preprocess is not None
        self._module: Any = None  # the PyTorch module of a split backbone, in ``_format``
        self._format: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Sent to Ray actors: they load their own copy of the model.
        state = dict(self.__dict__)
        state["_runner"], state["_module"], state["_format"] = None, None, None
        return state

    @property
    def loaded(self) -> bool:
        return self._runner is not None

    @property
    def runner(self) -> Any:
        if self._runner is None:
            from vfm.models import load_model
            from vfm.models.export import ExportNotFound, ExportStale

            log.info("loading backbone %s (%s) on %s", self.name, self.backend, self.device)
            options: dict[str, Any] = {}
            if self.backend == "onnx":
                import torch

                # The threads torch would use (--threads), and no busy-waiting between runs: that
                # would take the CPU the DataLoader workers need to prepare the next batch.
                options = {"repository": self.repository, "num_threads": torch.get_num_threads(), "spinning": False}
            try:
                self._runner = load_model(self.name, backend=self.backend, device=self.device, weights=self.weights,
                                          **options)
            except (ExportNotFound, ExportStale) as exc:
                raise BackboneError(_onnx_hint(str(exc), self.name)) from None
        return self._runner

    def weights_digest(self) -> str:
        from vfm.models.weights import resolve_weights

        path = resolve_weights(self.name, self.spec.weights, self.weights)
        if path is not None:
            return _path_digest(str(path))
        # Seeded random weights have no file; what they compute is their identity.
        probe = np.linspace(0, 255, 48 * 48 * 3).astype(np.uint8).reshape(48, 48, 3)
        out = self.runner.embed([probe, probe[::-1].copy()], normalize=False)
        return "random:" + hashlib.sha256(np.round(out, 4).astype(np.float32).tobytes()).hexdigest()

    def key(self) -> dict[str, Any]:
        if self._key is None:
            pre = self.spec.preprocess.to_json() if self.spec.preprocess else None
            self._key = {"backbone": self.name, "weights_sha256": self.weights_digest(), "preprocess": pre,
                         "normalize": self.normalize, "feature_dim": self.feature_dim, "version": FEATURES_VERSION}
            if self.backend == "onnx":  # the same features up to float rounding, cached apart all the same
                self._key.update(backend="onnx", onnx_sha256=self.onnx_digest())
        return self._key

    def onnx_digest(self) -> str:
        from vfm.models.export import ExportNotFound, ExportStale, find_export

        try:
            folder, config = find_export(self.name, self.repository, self.weights)
        except (ExportNotFound, ExportStale) as exc:
            raise BackboneError(_onnx_hint(str(exc), self.name)) from None
        return _path_digest(str(folder / str(config["version"])))

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.embed_prepared(self.prepare(images))

    def prepare(self, images: Sequence[np.ndarray]) -> Any:
        if not self._split:
            return list(images)
        from .loader import resize_batch

        return resize_batch(images, self.spec.preprocess)

    def join_prepared(self, parts: list[Any]) -> Any:
        if not self._split:
            return super().join_prepared(parts)
        return np.concatenate(parts) if parts else self.prepare([])

    def embed_prepared(self, prepared: Any) -> np.ndarray:
        self.images_embedded += len(prepared)
        if not self._split:
            return self.runner.embed(list(prepared), normalize=self.normalize)
        if not len(prepared):
            return np.zeros((0, self.feature_dim), np.float32)
        features = self._network_features(prepared)
        if self.normalize:  # as runner.embed(normalize=True) does
            features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(features, dtype=np.float32)

    def _memory_format(self, hw: tuple[int, ...]) -> Any:
        """Channels-last from 64 px up: efficientnet_lite0 at 224 px ran 1.4-1.6x faster on this CPU
        than NCHW; tiny_cnn at 32 px ran slower (its layers are too small to gain)."""
        import torch

        self._format = torch.channels_last if min(hw) >= 64 else torch.contiguous_format
        return self._format

    def _network_features(self, batch: np.ndarray) -> np.ndarray:
        """The ``features`` output of the backbone's network on resized uint8 [N, H, W, 3] images."""
        from vfm.models.images import normalize

        network = self.runner.network
        module = getattr(network, "module", None)
        if module is None:  # ONNX Runtime: the export's graph, on the NCHW input it was traced with
            return network.run({"input": normalize(batch, self.spec.preprocess)}, ["features"])["features"]
        import torch

        if self._module is None:
            self._module = module.to(memory_format=self._memory_format(batch.shape[1:3]))
        pre = self.spec.preprocess
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
        # NHWC memory seen as NCHW is channels-last already; the arithmetic is normalize()'s, in its order.
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(memory_format=self._format) / 255.0
        x = ((x - mean) / std).to(network.device, network.dtype)
        with torch.inference_mode():
            out = self._module(x)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return out[network.output_names.index("features")].float().cpu().numpy()

    def head_meta(self) -> dict[str, Any]:
        key = self.key()
        return {"backbone": self.name, "embed": {"normalize": self.normalize},
                "preprocess": key["preprocess"], "weights_sha256": key["weights_sha256"]}


def _onnx_hint(message: str, name: str) -> str:
    return (f"{message.split(' Run ')[0].split('; run ')[0].rstrip('.')}. Export it with `vfm export {name} --out DIR` "
            "and pass --repository DIR (default ./model_repository or $VFM_MODEL_REPOSITORY), or extract with "
            "--backend torch.")


@lru_cache(maxsize=16)
def _path_digest(path: str) -> str:
    from vfm.models.weights import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p)}\n{sha256_file(f)}\n".encode())
    return h.hexdigest()


def make_extractor(backbone: str, device: str = "auto", normalize: bool = False,
                   weights: str | None = None, backend: str = "torch",
                   repository: str | Path | None = None) -> Extractor:
    """``pixels[:SIZE][:rgb]`` or the name of a zoo backbone."""
    if backbone == "pixels" or backbone.startswith("pixels:"):
        parts = backbone.split(":")[1:]
        rgb = "rgb" in parts
        sizes = [p for p in parts if p != "rgb"]
        if len(sizes) > 1 or (sizes and not sizes[0].isdigit()) or (sizes and not 1 <= int(sizes[0]) <= 512):
            raise BackboneError(f"--backbone {backbone}: use pixels, pixels:SIZE or pixels:SIZE:rgb "
                                "(SIZE 1..512).")
        if normalize:
            raise BackboneError("--normalize applies to a backbone's embed(), not to pixels.")
        if backend != "torch":
            raise BackboneError(f"--backend {backend} applies to a zoo backbone, not to pixels.")
        return PixelExtractor(int(sizes[0]) if sizes else 28, rgb)
    return BackboneExtractor(backbone, device=device, normalize=normalize, weights=weights, backend=backend,
                             repository=repository)

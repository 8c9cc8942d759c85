"""The SAM family (segment-anything): sam_vit_b / sam_vit_l / sam_vit_h and the random tiny_sam.

Three things, kept apart as segment-anything keeps them: the network
(``segment_anything.modeling``, built here from a ``SamConfig``), the way to call it
(``sam_runner.SamRunner``, with prompt packing in ``sam_prompts``) and, later, the ONNX export
wrapper (``segment_anything.utils.onnx.SamOnnxModel`` over the same network).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..backends.torch import torch_dtype
from ..registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocess, register_model
from ..checkpoints import load_state_dict
from ..weights import UrlWeights, WeightsUnavailable
from .sam_runner import SamRunner

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamConfig:
    """The shape of a Sam network. ``registry_key`` names segment-anything's own builder for it."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    registry_key: str | None = None

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return out


# The official sizes, as segment_anything.build_sam defines them.
SAM_VIT_B = SamConfig(768, 12, 12, (2, 5, 8, 11), registry_key="vit_b")
SAM_VIT_L = SamConfig(1024, 24, 16, (5, 11, 17, 23), registry_key="vit_l")
SAM_VIT_H = SamConfig(1280, 32, 16, (7, 15, 23, 31), registry_key="vit_h")
# A 256-pixel input gives a 16x16 embedding and 64x64 low-res masks; the decoder keeps SAM's
# 256 channels so embeddings have the full-size layout [1, 256, h, w].
TINY_SAM = SamConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                     img_size=256, window_size=8, decoder_mlp_dim=256, iou_head_hidden_dim=64)

SAM_PREPROCESS = Preprocess(size=1024, resize_mode="longest_side", mean=IMAGENET_MEAN, std=IMAGENET_STD)
TINY_SAM_PREPROCESS = Preprocess(size=256, resize_mode="longest_side", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_sam_network(config: SamConfig) -> Sam:
    """A randomly initialised ``Sam`` of ``config``'s shape (seed it with ``seeded_sam_network``)."""
    if config.registry_key is not None:
        return sam_model_registry[config.registry_key](checkpoint=None)
    embedding = config.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth, embed_dim=config.encoder_embed_dim, img_size=config.img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.encoder_num_heads,
            patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes, window_size=config.window_size,
            out_chans=config.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(embedding, embedding),
            input_image_size=(config.img_size, config.img_size), mask_in_chans=config.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_embed_dim,
                                          mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def seeded_sam_network(config: SamConfig, seed: int = RANDOM_INIT_SEED) -> Sam:
    """The same random weights on every call, without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam_network(config)


def _checkpoint_file(spec: ModelSpec, path: Path) -> Path:
    """A weights folder holds the checkpoint under its official name (or is the only .pth/.safetensors)."""
    if not path.is_dir():
        return path
    if isinstance(spec.weights, UrlWeights) and (path / spec.weights.file_name).is_file():
        return path / spec.weights.file_name
    found = sorted(p for ext in ("*.pth", "*.pt", "*.safetensors") for p in path.glob(ext))
    if len(found) != 1:
        raise WeightsUnavailable(f"Weights for model {spec.name!r}: the folder {path} should hold one checkpoint "
                                 f"(.pth or .safetensors); found {len(found)}. Give the file's path instead.")
    return found[0]


def load_sam_weights(spec: ModelSpec, model: Sam, path: Path) -> None:
    """Load a checkpoint safely into ``model``; a checkpoint of another shape is ``WeightsUnavailable``."""
    path = _checkpoint_file(spec, Path(path))
    state = load_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches raise even with strict=False
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise WeightsUnavailable(f"Weights {path} do not fit model {spec.name!r} ({first}); is it the checkpoint "
                                 f"of another SAM size?") from None
    if missing or unexpected:
        raise WeightsUnavailable(
            f"Weights {path} do not fit model {spec.name!r}: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) and {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}).")


def build_sam_runner(spec: ModelSpec, config: SamConfig, weights_path: Path | None, device: str,
                     dtype: str | None = None) -> SamRunner:
    """The network of ``config`` with the checkpoint at ``weights_path`` (``None``: seeded random init)."""
    torch_dtype(dtype, device)  # a dtype this device cannot run fails before building a 600M-parameter network
    model = seeded_sam_network(config)
    if weights_path is not None:
        load_sam_weights(spec, model, weights_path)
    else:
        log.info("%s: seeded random weights (seed %d)", spec.name, RANDOM_INIT_SEED)
    return SamRunner(spec, model, device=device, weights_path=weights_path, dtype=dtype)


def _official(file_name: str, sha256: str) -> UrlWeights:
    return UrlWeights(CHECKPOINT_URL + file_name, sha256=sha256)


# sha256 of Meta's checkpoints (375,042,383 / 1,249,524,607 / 2,564,550,879 bytes), as pinned by
# micro-sam, SlicerSegmentAnything and others; the name suffix is an md5 prefix, not the sha256.
@register_model("sam_vit_b", task="segment", family="sam", tasks=("segment",),
                weights=_official("sam_vit_b_01ec64.pth",
                                  "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
                preprocess=SAM_PREPROCESS, extra={"config": SAM_VIT_B.to_json()},
                description="Segment Anything, ViT-B image encoder (Meta checkpoint).")
def sam_vit_b(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None) -> SamRunner:
    return build_sam_runner(spec, SAM_VIT_B, weights_path, device, dtype)


@register_model("sam_vit_l", task="segment", family="sam", tasks=("segment",),
                weights=_official("sam_vit_l_0b3195.pth",
                                  "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
                preprocess=SAM_PREPROCESS, extra={"config": SAM_VIT_L.to_json()},
                description="Segment Anything, ViT-L image encoder (Meta checkpoint).")
def sam_vit_l(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None) -> SamRunner:
    return build_sam_runner(spec, SAM_VIT_L, weights_path, device, dtype)


@register_model("sam_vit_h", task="segment", family="sam", tasks=("segment",),
                weights=_official("sam_vit_h_4b8939.pth",
                                  "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
                preprocess=SAM_PREPROCESS, extra={"config": SAM_VIT_H.to_json()},
                description="Segment Anything, ViT-H image encoder (Meta checkpoint).")
def sam_vit_h(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None) -> SamRunner:
    return build_sam_runner(spec, SAM_VIT_H, weights_path, device, dtype)


@register_model("tiny_sam", task="segment", family="sam", tasks=("segment",), weights=None, random_weights=True,
                preprocess=TINY_SAM_PREPROCESS, extra={"config": TINY_SAM.to_json()},
                description="A seeded random tiny SAM (256-pixel input) for tests and smoke deploys.")
def tiny_sam(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None) -> SamRunner:
    return build_sam_runner(spec, TINY_SAM, weights_path, device, dtype)

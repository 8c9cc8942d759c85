"""The SAM family (segment-anything): sam_vit_b / sam_vit_l / sam_vit_h and the random tiny_sam.

Three things, kept apart as segment-anything keeps them, in this order below: the way to call
the network (``SamRunner``: encode images once, segment many prompts, with prompt packing in
``sam_prompts``), the network (``segment_anything.modeling.Sam``, built from a ``SamConfig``),
and the builders of the zoo.

``SamRunner`` calls two networks: the image ``encoder`` (padded, normalised image ->
embedding) and the prompt ``decoder`` (embedding + packed prompts -> low-resolution mask
logits for all four mask tokens and their predicted IoU). On PyTorch they are the modules of
a ``Sam``; on ONNX Runtime the two graphs of its export (``vfm.models.export.sam``), which
compute the same. Everything that depends on the image's size happens in the runner, in
numpy and torch, for any size and aspect ratio: the longest-side resize and padding before
the encoder, the prompt packing, the choice of one or three masks, and the upscale / crop of
the padding / resize to the original size. segment-anything's own ``SamOnnxModel`` traces
that crop for the aspect ratio it was exported with, which is why it is not used.

segment-anything and torch are imported inside functions: registering these models needs neither.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..checkpoints import RANDOM_SEED, load_into, seeded
from ..images import as_rgb_array
from ..network import Network
from ..results import EverythingMasks, ImageEmbedding, Masks, Prompt
from ..runner import Runner, reject_options
from ..spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocess, register_model
from ..weights import UrlWeights, WeightsUnavailable
from .sam_prompts import PADDING_LABEL, check_embedding, pack_prompts

if TYPE_CHECKING:
    from .sam_everything import EverythingOptions

log = logging.getLogger(__name__)

ONNX_KIND = "sam"       # config.json "kind" of an export of this family
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Masks are upscaled to img_size x img_size before the crop; bound how many at once (16 x 1024^2 x 4 B = 64 MiB).
POSTPROCESS_CHUNK = 16


# ---- the runner ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamRuntime:
    """What the runner needs to know about the network around its calls (an export's config.json
    "runtime" holds the same fields, so an ONNX runner knows it without the network)."""

    img_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    mask_threshold: float
    embedding_shape: tuple[int, int, int]     # (channels, height, width) of one image embedding
    multimask: bool = True                    # the decoder predicts 1 + 3 masks; False: one mask per prompt

    @classmethod
    def from_json(cls, runtime: dict[str, Any]) -> "SamRuntime":
        return cls(img_size=int(runtime["img_size"]), pixel_mean=tuple(float(v) for v in runtime["pixel_mean"]),
                   pixel_std=tuple(float(v) for v in runtime["pixel_std"]),
                   mask_threshold=float(runtime["mask_threshold"]),
                   embedding_shape=tuple(int(v) for v in runtime["embedding_shape"]),  # type: ignore[arg-type]
                   multimask=bool(runtime.get("multimask", True)))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def sam_runtime(sam: Any) -> SamRuntime:
    """The ``SamRuntime`` of a segment-anything ``Sam`` network."""
    encoder = sam.prompt_encoder
    return SamRuntime(img_size=int(sam.image_encoder.img_size),
                      pixel_mean=tuple(float(v) for v in sam.pixel_mean.flatten()),  # type: ignore[arg-type]
                      pixel_std=tuple(float(v) for v in sam.pixel_std.flatten()),  # type: ignore[arg-type]
                      mask_threshold=float(sam.mask_threshold),
                      embedding_shape=(int(encoder.embed_dim), *(int(v) for v in encoder.image_embedding_size)))


class SamRunner(Runner):
    """``encode`` images into embeddings, then ``segment`` prompts on an embedding.

    On PyTorch, ``dtype`` (``float16``/``bfloat16``, CUDA only) applies to the image encoder and
    the mask decoder; the prompt encoder stays float32 because half precision cannot hold pixel
    coordinates up to 1024 to better than half a pixel. ``model`` is the PyTorch ``Sam`` (None on ONNX).
    """

    def __init__(self, spec: ModelSpec, encoder: Network, decoder: Network, device: str, runtime: SamRuntime, *,
                 model: Any = None, weights_path: Path | None = None, export: dict[str, Any] | None = None):
        super().__init__(spec, {"encoder": encoder, "decoder": decoder}, device=device, weights_path=weights_path,
                         export=export)
        from segment_anything.utils.transforms import ResizeLongestSide

        self.encoder, self.decoder = encoder, decoder
        self.model = model
        self.img_size = runtime.img_size
        self.pixel_mean = np.asarray(runtime.pixel_mean, np.float32)
        self.pixel_std = np.asarray(runtime.pixel_std, np.float32)
        self.mask_threshold = runtime.mask_threshold
        self.embedding_shape: tuple[int, int, int] = runtime.embedding_shape
        self.multimask = runtime.multimask
        self.transform = ResizeLongestSide(self.img_size)

    @property
    def postprocess_device(self) -> str:
        import torch

        # The upscaling runs in torch: on the GPU when this torch build has one
        return self.device if self.device.startswith("cuda") and torch.cuda.is_available() else "cpu"

    def info(self) -> dict[str, Any]:
        out = super().info()
        dtype = self.encoder.describe().get("dtype")
        if dtype is not None:
            out["dtype"] = dtype
        out.update(image_size=self.img_size, embedding_shape=list(self.embedding_shape))
        return out

    # ---- encode ---------------------------------------------------------------------------
    def encoder_input(self, image: np.ndarray, index: int = 0) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(input [3, S, S] float32, original size, resized size): ``SamPredictor.set_image``'s preprocessing.

        The image is resized so its longest side is ``img_size`` (``ResizeLongestSide``),
        normalised with the model's pixel mean/std and zero-padded to a square.
        """
        rgb = as_rgb_array(image)
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"image {index} is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels).")
        resized = self.transform.apply_image(rgb)
        x = (resized.astype(np.float32) - self.pixel_mean) / self.pixel_std
        padded = np.zeros((self.img_size, self.img_size, 3), np.float32)
        padded[: x.shape[0], : x.shape[1]] = x
        return (np.ascontiguousarray(padded.transpose(2, 0, 1)), (int(rgb.shape[0]), int(rgb.shape[1])),
                (int(resized.shape[0]), int(resized.shape[1])))

    def encode(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """One embedding per image (features: float32 numpy [1, C, h, w]); all images in one encoder call."""
        if not images:
            return []
        prepared = [self.encoder_input(image, i) for i, image in enumerate(images)]
        batch = np.stack([p[0] for p in prepared])
        features = self.encoder.run({"image": batch}, ["image_embeddings"])["image_embeddings"]
        # copy: a slice would keep the whole batch alive in an embedding cache.
        return [ImageEmbedding(features=np.array(features[i:i + 1], np.float32), original_size=original,
                               input_size=input_size, model=self.name)
                for i, (_, original, input_size) in enumerate(prepared)]

    # ---- segment --------------------------------------------------------------------------
    def segment(self, embedding: ImageEmbedding, prompts: Sequence[Prompt]) -> list[Masks]:
        """Masks for each prompt, at the original image resolution, in the order of ``prompts``.

        Points and boxes are pixels of the original image. Points must lie on the image
        (0 <= x <= width, 0 <= y <= height), else ``ValueError``; boxes are clipped to the image
        and one with no part on it is a ``ValueError`` (see ``sam_prompts.validate_prompt``).
        Prompts with the same number of points share one decoder call; a prompt's masks do not
        depend on the other prompts in the call. ``multimask`` gives the decoder's three masks,
        else its single mask (a one-mask decoder, ``SamRuntime.multimask`` False, refuses it as
        a ``ValueError``); scores are the predicted IoU; ``low_res_logits`` are the decoder's
        logits (256x256 for full-size SAM).
        """
        import torch

        features = self._check_embedding(embedding)
        groups = pack_prompts(prompts, embedding.original_size, self.img_size)
        if not self.multimask and any(multi for group in groups for multi in group.multimask):
            raise ValueError(f"Model {self.name!r} predicts one mask per prompt; multimask is not available "
                             "(leave it false).")
        results: list[Masks | None] = [None] * len(prompts)
        for group in groups:
            out = self.decoder.run({"image_embeddings": features, "point_coords": group.coords,
                                    "point_labels": group.labels}, ["low_res_masks", "iou_predictions"])
            logits, iou = out["low_res_masks"], out["iou_predictions"]
            # The decoder always predicts 1 + 3 masks; like MaskDecoder.forward, token 0 is the single-mask answer.
            chosen = [slice(1, None) if multi else slice(0, 1) for multi in group.multimask]
            low_res = [logits[row, sl] for row, sl in enumerate(chosen)]
            scores = [iou[row, sl] for row, sl in enumerate(chosen)]
            masks = self._postprocess(torch.from_numpy(np.concatenate(low_res)), embedding.input_size,
                                      embedding.original_size)
            start = 0
            for index, lr, score in zip(group.indices, low_res, scores):
                results[index] = Masks(masks=masks[start:start + len(lr)], scores=np.asarray(score, np.float32),
                                       low_res_logits=np.asarray(lr, np.float32))
                start += len(lr)
        return results  # type: ignore[return-value]  # every index was filled by its group

    def _postprocess(self, low_res: Any, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
        """Logits [M, h, w] -> bool masks [M, H, W]: upscale, crop the padding, resize to the original."""
        out = np.empty((len(low_res), *original_size), dtype=bool)
        for start in range(0, len(low_res), POSTPROCESS_CHUNK):
            upscaled = self.upscale_logits(low_res[start:start + POSTPROCESS_CHUNK], input_size, original_size)
            out[start:start + len(upscaled)] = (upscaled > self.mask_threshold).cpu().numpy()
        return out

    def upscale_logits(self, low_res: Any, input_size: tuple[int, int], original_size: tuple[int, int]) -> Any:
        """Low-res logits [M, h, w] (numpy or torch) -> logits [M, H, W] at the original size, a float torch
        tensor on ``postprocess_device`` (callers bound M: see ``POSTPROCESS_CHUNK``)."""
        import torch
        import torch.nn.functional as F

        chunk = torch.as_tensor(low_res).unsqueeze(1).to(self.postprocess_device)
        # The three steps of ``Sam.postprocess_masks``, with the same calls
        masks = F.interpolate(chunk, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)[:, 0]

    # ---- segment everything -----------------------------------------------------------------
    def point_candidates(self, embedding: ImageEmbedding, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every mask the decoder offers for each of ``points`` [B, 2] (original-image pixels) as a lone
        foreground click, in one decoder call: low-res logits [B, M, h, w] and predicted IoU [B, M].

        M is 3 for SAM's multimask tokens (what its automatic mask generator asks for), or 1 for a
        decoder that predicts one mask per prompt."""
        features = self._check_embedding(embedding)
        prompts = [Prompt(points=np.asarray(p, np.float64).reshape(1, 2), point_labels=np.ones(1), multimask=True)
                   for p in points]
        (group,) = pack_prompts(prompts, embedding.original_size, self.img_size)  # all have one point + padding
        out = self.decoder.run({"image_embeddings": features, "point_coords": group.coords,
                                "point_labels": group.labels}, ["low_res_masks", "iou_predictions"])
        logits, iou = out["low_res_masks"], out["iou_predictions"]
        tokens = slice(0, 1) if logits.shape[1] == 1 else slice(1, None)
        return np.asarray(logits[:, tokens], np.float32), np.asarray(iou[:, tokens], np.float32)

    def segment_everything(self, embedding: ImageEmbedding, options: "EverythingOptions | None" = None,
                           **kwargs: Any) -> EverythingMasks:
        """Every object of the image: see ``sam_everything.segment_everything`` (options as an
        ``EverythingOptions`` or as its keyword arguments)."""
        from .sam_everything import EverythingOptions, segment_everything

        if options is not None and kwargs:
            raise ValueError("give segment_everything() an EverythingOptions or keyword options, not both.")
        return segment_everything(self, embedding, options or EverythingOptions(**kwargs))

    def _check_embedding(self, embedding: ImageEmbedding) -> np.ndarray:
        """The embedding's features as float32 numpy, after checking they fit this model."""
        check_embedding(embedding, self.name, self.img_size, self.embedding_shape)
        features = embedding.features
        if hasattr(features, "detach"):  # a torch tensor (e.g. made by hand)
            features = features.detach().float().cpu().numpy()
        return np.ascontiguousarray(features, dtype=np.float32)


# ---- the network -----------------------------------------------------------------------------

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


def build_sam_network(config: SamConfig) -> Any:
    """A randomly initialised ``Sam`` of ``config``'s shape (``seeded`` makes it reproducible)."""
    from functools import partial

    import torch
    from segment_anything import sam_model_registry
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

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


def embed_points(prompt_encoder: Any, coords: Any, labels: Any) -> Any:
    """Sparse prompt embeddings [B, N, C] for points labelled -1/0/1/2/3 (see ``sam_prompts``).

    The same sums as ``PromptEncoder._embed_points`` + ``_embed_boxes`` (and ``SamOnnxModel``'s
    ``_embed_points``), but for every label in one pass so mixed prompts stack into one tensor.
    """
    pe = prompt_encoder.pe_layer.forward_with_coords(coords + 0.5, prompt_encoder.input_image_size)
    labels = labels.unsqueeze(-1)
    # Multiplying by a 0/1 mask adds exact zeros, so each token equals the reference sum bit for bit.
    embedding = pe * (labels != PADDING_LABEL)
    embedding = embedding + prompt_encoder.not_a_point_embed.weight * (labels == PADDING_LABEL)
    for i in range(prompt_encoder.num_point_embeddings):
        embedding = embedding + prompt_encoder.point_embeddings[i].weight * (labels == i)
    return embedding


def prompt_decoder_module(sam: Any) -> Any:
    """The decoder call as one module: ``image_embeddings``, ``point_coords``, ``point_labels`` ->
    ``low_res_masks``, ``iou_predictions`` (sparse + dense prompt embeddings and the mask decoder,
    nothing that depends on the image's size). The PyTorch backend calls it; the export traces it.
    The prompt encoder runs in float32 whatever the mask decoder's dtype."""
    from torch import nn

    class SamPromptDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt_encoder = sam.prompt_encoder
            self.mask_decoder = sam.mask_decoder
            self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone())

        def forward(self, image_embeddings: Any, point_coords: Any, point_labels: Any) -> tuple[Any, Any]:
            dtype = self.mask_decoder.iou_token.weight.dtype
            sparse = embed_points(self.prompt_encoder, point_coords, point_labels)
            height, width = self.prompt_encoder.image_embedding_size
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                point_coords.shape[0], -1, height, width)
            return self.mask_decoder.predict_masks(image_embeddings=image_embeddings.to(dtype),
                                                   image_pe=self.image_pe.to(dtype),
                                                   sparse_prompt_embeddings=sparse.to(dtype),
                                                   dense_prompt_embeddings=dense.to(dtype))

    return SamPromptDecoder().eval()


# ---- building --------------------------------------------------------------------------------

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


def build_sam_runner(spec: ModelSpec, config: SamConfig, weights_path: Path | None, device: str,
                     dtype: str | None = None) -> SamRunner:
    """The network of ``config`` with the checkpoint at ``weights_path`` (``None``: seeded random init)."""
    from ..backends.torch import TorchNetwork, torch_dtype

    tdtype = torch_dtype(dtype, device)  # a dtype this device cannot run fails before building a 600M-parameter network
    model = seeded(lambda: build_sam_network(config))
    if weights_path is not None:
        load_into(model, _checkpoint_file(spec, Path(weights_path)), spec.name)
    else:
        log.info("%s: seeded random weights (seed %d)", spec.name, RANDOM_SEED)
    model = model.eval().to(device)
    encoder = TorchNetwork(model.image_encoder, ["image"], ["image_embeddings"], device=device, dtype=tdtype)
    model.mask_decoder.to(tdtype)
    decoder = TorchNetwork(prompt_decoder_module(model), ["image_embeddings", "point_coords", "point_labels"],
                           ["low_res_masks", "iou_predictions"], device=device,
                           uncast_inputs=("image_embeddings", "point_coords", "point_labels"))
    return SamRunner(spec, encoder, decoder, device, sam_runtime(model), model=model, weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                **options: Any) -> SamRunner:
    """The ONNX runner: the same ``SamRunner`` over the export's encoder and decoder graphs."""
    reject_options(spec, "onnx", options, ())
    return SamRunner(spec, networks["encoder"], networks["decoder"], device,
                     SamRuntime.from_json(config.get("runtime") or {}), weights_path=folder, export=config)


# ---- the zoo ---------------------------------------------------------------------------------

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

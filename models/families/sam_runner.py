"""How to call a segment-anything ``Sam`` network: encode images once, segment many prompts.

The network is ``segment_anything.modeling.Sam`` (built in ``sam.py``); this module is the
PyTorch equivalent of ``SamPredictor`` for lists of images and lists of prompts. Prompts are
packed by ``sam_prompts`` the way ``SamOnnxModel`` takes them, so an ONNX runner can share
the packing and be compared row for row with this one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.utils.transforms import ResizeLongestSide

from ..backends.torch import torch_dtype
from ..images import as_rgb_array
from ..registry import ModelSpec
from ..results import ImageEmbedding, Masks, Prompt
from ..runner import Runner
from .sam_prompts import PADDING_LABEL, check_embedding, pack_prompts

log = logging.getLogger(__name__)

# Masks are upscaled to img_size x img_size before the crop; bound how many at once (16 x 1024^2 x 4 B = 64 MiB).
POSTPROCESS_CHUNK = 16


def embed_points(prompt_encoder: PromptEncoder, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


class SamRunner(Runner):
    """``encode`` images into embeddings, then ``segment`` prompts on an embedding.

    ``dtype`` (``float16``/``bfloat16``, CUDA only) applies to the image encoder and the mask
    decoder; the prompt encoder stays float32 because half precision cannot hold pixel
    coordinates up to 1024 to better than half a pixel.
    """

    def __init__(self, spec: ModelSpec, model: Sam, device: str = "cpu", weights_path: Path | None = None,
                 dtype: str | None = None):
        super().__init__(spec, device=device, weights_path=weights_path)
        self.dtype = torch_dtype(dtype, device)
        self.model = model.eval().to(device)
        self.model.image_encoder.to(self.dtype)
        self.model.mask_decoder.to(self.dtype)
        self.img_size: int = int(self.model.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image embedding."""
        h, w = self.model.prompt_encoder.image_embedding_size
        return int(self.model.prompt_encoder.embed_dim), int(h), int(w)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(dtype=str(self.dtype).removeprefix("torch."), image_size=self.img_size,
                   embedding_shape=list(self.embedding_shape))
        return out

    # ---- encode ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """One embedding per image; all images go through the encoder in one batch.

        Each image is resized so its longest side is ``img_size`` (``ResizeLongestSide``),
        normalised with the model's pixel mean/std and zero-padded to a square, as
        ``SamPredictor.set_image`` does.
        """
        if not images:
            return []
        batch, sizes = [], []
        for i, image in enumerate(images):
            rgb = as_rgb_array(image)
            if rgb.shape[0] == 0 or rgb.shape[1] == 0:
                raise ValueError(f"image {i} is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels).")
            resized = self.transform.apply_image(rgb)
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()
            batch.append(self.model.preprocess(tensor))
            sizes.append(((int(rgb.shape[0]), int(rgb.shape[1])), (int(resized.shape[0]), int(resized.shape[1]))))
        features = self.model.image_encoder(torch.stack(batch).to(self.dtype))
        # clone: a slice would keep the whole batch alive in an embedding cache.
        return [ImageEmbedding(features=features[i:i + 1].clone(), original_size=original, input_size=input_size,
                               model=self.name)
                for i, (original, input_size) in enumerate(sizes)]

    # ---- segment --------------------------------------------------------------------------
    @torch.inference_mode()
    def segment(self, embedding: ImageEmbedding, prompts: Sequence[Prompt]) -> list[Masks]:
        """Masks for each prompt, at the original image resolution, in the order of ``prompts``.

        Points and boxes are pixels of the original image. Points must lie on the image
        (0 <= x <= width, 0 <= y <= height), else ``ValueError``; boxes are clipped to the image
        and one with no part on it is a ``ValueError`` (see ``sam_prompts.validate_prompt``).
        Prompts with the same number of points share one prompt-encoder + mask-decoder call;
        a prompt's masks do not depend on the other prompts in the call.
        ``multimask`` gives the decoder's three masks, else its single mask; scores are the
        predicted IoU; ``low_res_logits`` are the decoder's logits (256x256 for full-size SAM).
        """
        features = self._check_embedding(embedding)
        groups = pack_prompts(prompts, embedding.original_size, self.img_size)
        results: list[Masks | None] = [None] * len(prompts)
        encoder = self.model.prompt_encoder
        image_pe = encoder.get_dense_pe().to(self.dtype)
        for group in groups:
            coords = torch.as_tensor(group.coords, device=self.device)
            labels = torch.as_tensor(group.labels, device=self.device)
            sparse = embed_points(encoder, coords, labels).to(self.dtype)
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(group.indices), -1, *encoder.image_embedding_size).to(self.dtype)
            logits, iou = self.model.mask_decoder.predict_masks(
                image_embeddings=features, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense)
            # The decoder always predicts 1 + 3 masks; like MaskDecoder.forward, token 0 is the single-mask answer.
            chosen = [slice(1, None) if multi else slice(0, 1) for multi in group.multimask]
            low_res = [logits[row, sl].float() for row, sl in enumerate(chosen)]
            scores = [iou[row, sl].float() for row, sl in enumerate(chosen)]
            masks = self._postprocess(torch.cat(low_res), embedding.input_size, embedding.original_size)
            start = 0
            for index, lr, score in zip(group.indices, low_res, scores):
                results[index] = Masks(masks=masks[start:start + len(lr)], scores=score.cpu().numpy(),
                                       low_res_logits=lr.cpu().numpy())
                start += len(lr)
        return results  # type: ignore[return-value]  # every index was filled by its group

    def _postprocess(self, low_res: torch.Tensor, input_size: tuple[int, int],
                     original_size: tuple[int, int]) -> np.ndarray:
        """Logits [M, h, w] -> bool masks [M, H, W]: upscale, crop the padding, resize to the original."""
        out = np.empty((len(low_res), *original_size), dtype=bool)
        for start in range(0, len(low_res), POSTPROCESS_CHUNK):
            chunk = low_res[start:start + POSTPROCESS_CHUNK].unsqueeze(1)
            upscaled = self.model.postprocess_masks(chunk, tuple(input_size), tuple(original_size))
            out[start:start + len(chunk)] = (upscaled[:, 0] > self.model.mask_threshold).cpu().numpy()
        return out

    def _check_embedding(self, embedding: ImageEmbedding) -> torch.Tensor:
        """The embedding's features on this runner's device and dtype, after checking they fit it."""
        check_embedding(embedding, self.name, self.img_size, self.embedding_shape)
        return torch.as_tensor(embedding.features).to(self.device, self.dtype)

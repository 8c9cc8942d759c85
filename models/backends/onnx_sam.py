"""SAM on ONNX Runtime: the image encoder graph and the prompt decoder graph, with Python around them.

The decoder graph (``vfm.models.export_sam``) returns low-resolution mask logits for all four
mask tokens and their predicted IoU. Everything that depends on the image's size happens
here, in Python, for any size and aspect ratio: the longest-side resize and padding before
the encoder, the prompt packing (``sam_prompts``, shared with the PyTorch runner), the choice
of one or three masks, and the upscale / crop of the padding / resize to the original size.
segment-anything's own ``SamOnnxModel`` traces that crop for the aspect ratio it was
exported with, which is why it is not used.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ..families.sam_prompts import check_embedding, pack_prompts
from ..images import as_rgb_array
from ..registry import ModelSpec
from ..results import ImageEmbedding, Masks, Prompt
from ..runner import Runner
from .onnx import LoadedExport, OnnxRunnerMixin, OnnxSession

log = logging.getLogger(__name__)

POSTPROCESS_CHUNK = 16  # masks upscaled at once (16 x 1024^2 x 4 B = 64 MiB), as the PyTorch runner


def postprocess_masks(low_res: Any, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int]) -> Any:
    """Mask logits [M, 1, h, w] -> [M, 1, H, W] at the original size: the steps of ``Sam.postprocess_masks``.

    That is a method of the PyTorch network, which an ONNX runner does not have; the three
    steps are repeated here with the same calls, and the tests hold the two runners' masks together.
    """
    import torch.nn.functional as F

    masks = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


class OnnxSam(OnnxRunnerMixin, Runner):
    """``encode`` and ``segment`` with the PyTorch ``SamRunner``'s contract and results."""

    def __init__(self, spec: ModelSpec, loaded: LoadedExport, device: str, **options: Any):
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        if options:
            raise ValueError(f"Model {spec.name!r} (ONNX) does not take option(s) {', '.join(sorted(options))}.")
        super().__init__(spec, device=device, weights_path=loaded.folder)
        self.export = loaded
        runtime = loaded.runtime
        self.encoder: OnnxSession = loaded.sessions["encoder"]
        self.decoder: OnnxSession = loaded.sessions["decoder"]
        self.img_size = int(runtime["img_size"])
        self.pixel_mean = np.asarray(runtime["pixel_mean"], np.float32)
        self.pixel_std = np.asarray(runtime["pixel_std"], np.float32)
        self.mask_threshold = float(runtime["mask_threshold"])
        self.embedding_shape: tuple[int, int, int] = tuple(int(v) for v in runtime["embedding_shape"])  # type: ignore
        self.transform = ResizeLongestSide(self.img_size)
        # The upscaling runs in torch: on the GPU when this torch build has one
        self.torch_device = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(image_size=self.img_size, embedding_shape=list(self.embedding_shape))
        return out

    # ---- encode ---------------------------------------------------------------------------
    def encoder_input(self, image: np.ndarray, index: int = 0) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(input [3, S, S] float32, original size, resized size): ``SamPredictor.set_image``'s preprocessing."""
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
        return [ImageEmbedding(features=np.ascontiguousarray(features[i:i + 1]), original_size=original,
                               input_size=input_size, model=self.name)
                for i, (_, original, input_size) in enumerate(prepared)]

    # ---- segment --------------------------------------------------------------------------
    def segment(self, embedding: ImageEmbedding, prompts: Sequence[Prompt]) -> list[Masks]:
        """Masks for each prompt at the original resolution; prompts with as many points share a decoder call."""
        import torch

        features = self._check_embedding(embedding)
        groups = pack_prompts(prompts, embedding.original_size, self.img_size)
        results: list[Masks | None] = [None] * len(prompts)
        for group in groups:
            out = self.decoder.run({"image_embeddings": features, "point_coords": group.coords,
                                    "point_labels": group.labels}, ["low_res_masks", "iou_predictions"])
            logits, iou = out["low_res_masks"], out["iou_predictions"]
            # Token 0 is the single-mask answer, tokens 1-3 the multimask ones (MaskDecoder.forward's rule)
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
        out = np.empty((len(low_res), *original_size), dtype=bool)
        for start in range(0, len(low_res), POSTPROCESS_CHUNK):
            chunk = low_res[start:start + POSTPROCESS_CHUNK].unsqueeze(1).to(self.torch_device)
            upscaled = postprocess_masks(chunk, self.img_size, tuple(input_size), tuple(original_size))
            out[start:start + len(chunk)] = (upscaled[:, 0] > self.mask_threshold).cpu().numpy()
        return out

    def _check_embedding(self, embedding: ImageEmbedding) -> np.ndarray:
        check_embedding(embedding, self.name, self.img_size, self.embedding_shape)
        features = embedding.features
        if hasattr(features, "detach"):  # an embedding from the PyTorch runner
            features = features.detach().float().cpu().numpy()
        return np.ascontiguousarray(features, dtype=np.float32)

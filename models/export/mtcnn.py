"""Export MTCNN (``mtcnn_faces``) as its three small networks: pnet.onnx, rnet.onnx, onet.onnx.

MTCNN is a cascade run in Python (an image pyramid through PNet, NMS, crops through RNet and
ONet, box regression). Only the networks go to ONNX; ``MTCNNFaceDetector`` runs the batched
cascade (``detect_faces``, facenet's ``detect_face`` batched) around them, so the cascade is the
same code on both backends. PNet is fully convolutional and takes any batch, height and width
(one call per pyramid level, all images of the batch); RNet (24x24 crops) and ONet (48x48)
take any number of crops (all crops of all images, up to 512 a call).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..families.mtcnn import NET_OUTPUTS
from .common import FamilyExport, Parity, Tolerance, export_graph, parity_session

# The cascade calls the three small graphs about eleven times an image with torch and numpy work
# (NMS, box arithmetic, crops) in between, so ONNX Runtime's pool threads, spinning after each run
# as they do by default, take the cores that work needs. Without spinning (bench/backends.py-like
# timing, 2 threads, 640x480 photo, real weights, each backend in a process of its own): batch 1
# 28.1 ms back to back (61.0 spinning; PyTorch 27.4), 38.0 with a 0.3 s pause before each call
# (40.1; PyTorch 37.7); batch 8 206 ms either way (334 / 283 spinning; PyTorch 346 / 302). A
# replica's own ``spinning`` option still wins.
SESSION = {"allow_spinning": False}

log = logging.getLogger(__name__)

# Input crop side of each network, None for any size (PNet is fully convolutional)
CROP_SIDES: dict[str, int | None] = {"pnet": None, "rnet": 24, "onet": 48}
# PNet inputs of several sizes and aspect ratios (pyramid levels are every size from 12 up)
PNET_PARITY_SHAPES = ((1, 12, 12), (2, 37, 53), (1, 120, 80), (1, 53, 211), (3, 64, 64))
CROP_PARITY_BATCHES = (1, 7, 32)


def _pyramid_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random pixels normalised the way ``detect_face`` feeds the nets: (x - 127.5) / 128."""
    pixels = rng.integers(0, 256, shape).astype(np.float32)
    return ((pixels - np.float32(127.5)) * np.float32(0.0078125)).astype(np.float32)


def export_mtcnn(runner: Any, folder: Path, opset: int, tolerance: Tolerance, external_data: bool | None,
                 seed: int) -> FamilyExport:
    """``MTCNNFaceDetector`` -> pnet/rnet/onet graphs, each checked on inputs of several shapes."""
    import torch

    rng = np.random.default_rng(seed)
    graphs = []
    parity = Parity(tolerance, sizes=[list(s) for s in PNET_PARITY_SHAPES])
    for key, outputs in NET_OUTPUTS.items():
        side = CROP_SIDES[key]
        net = runner.torch_module(key).float().eval()
        if side is None:
            axes = {"input": {0: "batch", 2: "height", 3: "width"},
                    **{name: {0: "batch", 2: "out_height", 3: "out_width"} for name in outputs}}
            example = _pyramid_input(rng, (2, 3, 45, 61))
            shapes = PNET_PARITY_SHAPES
        else:
            axes = {"input": {0: "crops"}, **{name: {0: "crops"} for name in outputs}}
            example = _pyramid_input(rng, (4, 3, side, side))
            shapes = tuple((n, side, side) for n in CROP_PARITY_BATCHES)
        graph = export_graph(net, (torch.from_numpy(example),), folder, key, ["input"], list(outputs), axes, opset,
                             external_data)
        session = parity_session(folder / graph.file)
        for n, height, width in shapes:
            x = _pyramid_input(rng, (n, 3, height, width))
            got = session.run(list(outputs), {"input": x})
            with torch.no_grad():
                ref = [t.numpy() for t in net(torch.from_numpy(x))]
            for name, a, b in zip(outputs, got, ref):
                parity.tensor(f"{key}_{name}", a, b)
            parity.count(f"{key}_inputs_compared")
        graphs.append(graph)
    return FamilyExport(kind="mtcnn", graphs=graphs, parity=parity.to_json(),
                        runtime={"outputs": {k: list(v) for k, v in NET_OUTPUTS.items()}},
                        labels=list(runner.labels), session=dict(SESSION))

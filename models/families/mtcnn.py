"""``mtcnn_faces``: facenet-pytorch's MTCNN face detector with the weights its wheel ships.

facenet's ``MTCNN`` class would ``torch.load`` its three files itself (full unpickling), so
we build ``PNet``/``RNet``/``ONet`` with ``pretrained=False``, load their state dicts with the
safe ``vfm.models.checkpoints.load_into``, and run facenet's cascade (``detect_face``) as
``detect_faces`` here: the same stages and box arithmetic (facenet's own functions), batched
across images and crops. The three networks are PyTorch modules or the graphs of an ONNX
export; the cascade calls them as ``Network``s, the same way on both backends.

Where the time goes: facenet resizes each pyramid level with ``interpolate(mode="area")``
(adaptive average pooling, slow on a CPU) and cuts and resizes every RNet/ONet crop in a
Python loop. ``detect_faces`` gets every level and every crop, bit for bit the same pixels,
by gathers from one summed-area table of the batch (``SummedAreas``), so nearly all the
time left is the three networks: PNet over the pyramid (most of it), RNet, ONet.

Thresholds: MTCNN filters at each of its three stages (facenet defaults 0.6, 0.7, 0.7). The
first two only prune proposals and their scores are never reported; the score a detection
carries is ONet's, the last stage. So ``score_threshold`` becomes the ONet threshold and the
proposal stages keep facenet's defaults (``stage_thresholds`` option). ``iou_threshold`` is
applied as IoU NMS after MTCNN's own final "Min" NMS at 0.7.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..checkpoints import load_into, seeded
from ..network import Network
from ..runner import reject_options
from ..spec import ModelSpec, register_model
from ..weights import PackageWeights, WeightsUnavailable
from .detection import DetectArgs, DetectionRunner, RawDetections

log = logging.getLogger(__name__)

ONNX_KIND = "mtcnn"                     # config.json "kind" of an export of this family
FACE_LABELS = ("face",)
DEFAULT_STAGE_THRESHOLDS = (0.6, 0.7)   # PNet, RNet: facenet's defaults
PYRAMID_FACTOR = 0.709                  # facenet's default scale step
CROP_CHUNK = 512                        # RNet/ONet crops per network call at most (facenet's chunk)
# Each network's outputs, in the order it returns them; its input is "input"
NET_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pnet": ("regression", "probability"),
    "rnet": ("regression", "probability"),
    "onet": ("regression", "landmarks", "probability"),
}


def facenet_data_dir() -> Path:
    """The ``data`` folder of the installed facenet-pytorch (holds pnet.pt, rnet.pt, onet.pt)."""
    spec = importlib.util.find_spec("facenet_pytorch")  # finds it without importing it
    if spec is None or not spec.origin:
        raise ImportError("facenet_pytorch is not installed")
    return Path(spec.origin).parent / "data"


MTCNN_WEIGHTS = PackageWeights(package="facenet-pytorch", locate=facenet_data_dir,
                               install_hint="pip install --no-deps facenet-pytorch==2.6.0")


def area_bins(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The bins of torch's area resize (``interpolate(mode="area")``, i.e. adaptive average pooling):
    output ``i`` averages inputs ``[start[i], end[i])``."""
    i = np.arange(size_out, dtype=np.int64)
    return (i * size_in) // size_out, ((i + 1) * size_in + size_out - 1) // size_out


class SummedAreas:
    """Summed-area tables of a batch of ``[B, H, W, C]`` uint8 images: the area resize of the whole
    image (a pyramid level) or of any crop, for a whole batch of crops at once, as gathers.

    The result is bit for bit torch's ``interpolate(mode="area")`` of the float image, which
    facenet's cascade uses: pixel sums of integers are exact either way, and the mean is
    ``float32(sum) / rows / cols`` as torch's CPU kernel computes it. The tables are uint32 and
    wrap around past 2**32; the difference of four corners is still the exact sum of a
    rectangle (modular arithmetic), as long as that sum is below 2**32 (16 million pixels).
    Laid out ``[B, H + 1, W + 1, C]``: a pyramid level gathers whole rows, then columns; a crop
    gathers the C values of a corner in one index.
    """

    def __init__(self, images: np.ndarray):
        batch, height, width, channels = images.shape
        table = np.zeros((batch, height + 1, width + 1, channels), np.uint32)
        table[:, 1:, 1:] = images
        np.add.accumulate(table, axis=2, out=table)
        for row in range(1, height + 1):  # row by row, each a vectorised add: faster than a cumsum across rows
            np.add(table[:, row], table[:, row - 1], out=table[:, row])
        self.table = table
        self.corners = table.reshape(-1, channels)  # [B * (H + 1) * (W + 1), C]
        self.height, self.width = height, width

    @staticmethod
    def _normalised(sums: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``[N, h, w, C]`` sums over ``rows`` x ``cols`` pixels -> ``[N, C, h, w]`` float32 means,
        normalised the way the nets take them, ``(mean - 127.5) / 128`` (facenet's order of operations)."""
        out = sums.astype(np.float32)
        out /= rows.astype(np.float32)
        out /= cols.astype(np.float32)
        out -= np.float32(127.5)
        out *= np.float32(0.0078125)
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))

    def resize(self, height: int, width: int) -> np.ndarray:
        """Every image area-resized to ``height`` x ``width``: ``[B, C, height, width]`` normalised float32."""
        y0, y1 = area_bins(self.height, height)
        x0, x1 = area_bins(self.width, width)
        rows = np.take(self.table, y1, axis=1)
        rows -= np.take(self.table, y0, axis=1)     # [B, height, W + 1, C]: sums of the row bands
        sums = np.take(rows, x1, axis=2)
        sums -= np.take(rows, x0, axis=2)
        return self._normalised(sums, (y1 - y0)[:, None, None], (x1 - x0)[:, None])

    def crops(self, image_inds: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray,
              side: int) -> np.ndarray:
        """Crops ``[y0, y1) x [x0, x1)`` of images ``image_inds`` area-resized to ``side`` x ``side``:
        ``[N, C, side, side]`` normalised float32."""
        i = np.arange(side, dtype=np.int64)
        heights, widths = (y1 - y0)[:, None], (x1 - x0)[:, None]
        ys = y0[:, None] + (i * heights) // side
        ye = y0[:, None] + ((i + 1) * heights + side - 1) // side
        xs = (x0[:, None] + (i * widths) // side)[:, None, :]
        xe = (x0[:, None] + ((i + 1) * widths + side - 1) // side)[:, None, :]
        # flat corner indices: [N, side, 1] row starts + [N, 1, side] columns -> [N, side, side]
        first_row = image_inds[:, None] * (self.height + 1)
        row_s = ((first_row + ys) * (self.width + 1))[:, :, None]
        row_e = ((first_row + ye) * (self.width + 1))[:, :, None]
        sums = np.take(self.corners, row_e + xe, axis=0)   # [N, side, side, C]
        sums -= np.take(self.corners, row_s + xe, axis=0)
        sums -= np.take(self.corners, row_e + xs, axis=0)
        sums += np.take(self.corners, row_s + xs, axis=0)
        return self._normalised(sums, (ye - ys)[:, :, None, None], (xe - xs)[:, :, :, None])


def pyramid_scales(height: int, width: int, min_face_size: int, factor: float = PYRAMID_FACTOR) -> list[float]:
    """facenet's image pyramid: scale 12 / min_face_size, then times ``factor`` while the short side >= 12."""
    scale = 12.0 / min_face_size
    short = min(height, width) * scale
    scales = []
    while short >= 12:
        scales.append(scale)
        scale *= factor
        short *= factor
    return scales


def _run_crops(network: Network, crops: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
    """One network call per ``CROP_CHUNK`` crops (as facenet does, to bound memory), outputs concatenated."""
    parts = [network.run({"input": crops[i:i + CROP_CHUNK]}, outputs) for i in range(0, len(crops), CROP_CHUNK)]
    return [np.concatenate([p[name] for p in parts]) for name in outputs]


def detect_faces(images: np.ndarray, min_face_size: int, thresholds: Sequence[float],
                 nets: Mapping[str, Network]) -> list[tuple[np.ndarray, np.ndarray]]:
    """facenet-pytorch's ``detect_face`` for a ``[B, H, W, 3]`` uint8 batch, batched: PNet once per
    pyramid level for all images, RNet and ONet once for all crops of all images, every crop
    cut and resized by gathers from one summed-area table (``SummedAreas``) instead of one
    ``interpolate`` per crop, and the pyramid from the same table. The box arithmetic is
    facenet's own functions, so the answer is facenet's (the tests compare them): per image
    ``boxes [N, 5]`` (x0, y0, x1, y1, score) and ``landmarks [N, 5, 2]``, float32.
    """
    import torch
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, generateBoundingBox, pad, rerec
    from torchvision.ops import batched_nms

    batch, height, width = images.shape[:3]
    areas = SummedAreas(images)
    with torch.inference_mode():
        # Stage 1: PNet over the pyramid, every image of the batch in one call per level; NMS
        # within each level and image, then within each image.
        level_boxes, level_inds = [], []
        for scale in pyramid_scales(height, width, min_face_size):
            level = areas.resize(int(height * scale + 1), int(width * scale + 1))
            out = nets["pnet"].run({"input": level}, NET_OUTPUTS["pnet"])
            boxes, inds = generateBoundingBox(torch.from_numpy(out["regression"]),
                                              torch.from_numpy(out["probability"])[:, 1], scale, thresholds[0])
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.5)
            level_boxes.append(boxes[pick])
            level_inds.append(inds[pick])
        boxes, image_inds = torch.cat(level_boxes), torch.cat(level_inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], dim=1)
        boxes = rerec(boxes)

        def cut(boxes: Any, image_inds: Any, side: int) -> tuple[Any, Any, np.ndarray]:
            """The crops of ``boxes`` (clipped to the image as facenet does), without the empty ones."""
            y, ey, x, ex = pad(boxes, width, height)
            keep = (ey > y - 1) & (ex > x - 1)
            if not keep.all():  # a box wholly outside the image: facenet would fail on it; it has no pixels
                kept = torch.from_numpy(np.flatnonzero(keep))
                boxes, image_inds, y, ey, x, ex = boxes[kept], image_inds[kept], y[keep], ey[keep], x[keep], ex[keep]
            crops = areas.crops(image_inds.numpy(), y.astype(np.int64) - 1, ey.astype(np.int64),
                                x.astype(np.int64) - 1, ex.astype(np.int64), side)
            return boxes, image_inds, crops

        # Stage 2: RNet on 24x24 crops of every proposal of every image.
        if len(boxes) > 0:
            boxes, image_inds, crops = cut(boxes, image_inds, 24)
            reg, prob = (torch.from_numpy(a) for a in _run_crops(nets["rnet"], crops, NET_OUTPUTS["rnet"]))
            score = prob[:, 1]
            ipass = score > thresholds[1]
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds, reg = image_inds[ipass], reg[ipass]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes = rerec(bbreg(boxes[pick], reg[pick]))
            image_inds = image_inds[pick]

        # Stage 3: ONet on 48x48 crops: scores, box regression, landmarks; facenet's "Min" NMS.
        points = torch.zeros(0, 5, 2)
        if len(boxes) > 0:
            boxes, image_inds, crops = cut(boxes, image_inds, 48)
            reg, marks, prob = (torch.from_numpy(a) for a in _run_crops(nets["onet"], crops, NET_OUTPUTS["onet"]))
            score = prob[:, 1]
            ipass = score > thresholds[2]
            marks = marks[ipass]
            boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
            image_inds, reg = image_inds[ipass], reg[ipass]
            w_i = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
            h_i = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
            points = torch.stack((w_i * marks[:, :5] + boxes[:, 0:1] - 1,
                                  h_i * marks[:, 5:10] + boxes[:, 1:2] - 1), dim=2)
            boxes = bbreg(boxes, reg)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes, points, image_inds = boxes.numpy(), points.numpy(), image_inds.numpy()
    return [(boxes[image_inds == b].astype(np.float32).reshape(-1, 5),
             points[image_inds == b].astype(np.float32).reshape(-1, 5, 2)) for b in range(batch)]


class MTCNNFaceDetector(DetectionRunner):
    """Faces with five landmarks (eyes, nose, mouth corners) in ``Detection.extra["landmarks"]``."""

    def __init__(self, spec: ModelSpec, networks: Mapping[str, Network], device: str, *,
                 min_face_size: int = 20, stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS,
                 weights_path: Path | None = None, export: dict[str, Any] | None = None):
        if isinstance(min_face_size, bool) or not isinstance(min_face_size, int) or min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 pixels (PNet's window), got {min_face_size!r}.")
        stage_thresholds = tuple(stage_thresholds)
        if len(stage_thresholds) != 2 or not all(0.0 <= float(t) <= 1.0 for t in stage_thresholds):
            raise ValueError(f"stage_thresholds must be two numbers in [0, 1] (PNet, RNet), got {stage_thresholds!r}.")
        super().__init__(spec, networks, device=device, weights_path=weights_path, export=export)
        self.min_face_size = int(min_face_size)
        self.stage_thresholds = tuple(float(t) for t in stage_thresholds)

    def _detect_group(self, images: list[np.ndarray], args: DetectArgs) -> list[RawDetections]:
        height, width = images[0].shape[:2]
        if min(height, width) < max(self.min_face_size, 12):
            # Smaller than the smallest face (and than PNet's 12-pixel window): facenet would
            # build an empty pyramid and fail on it.
            return [RawDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), []) for _ in images]
        thresholds = [*self.stage_thresholds, args.score_threshold]
        out = []
        for boxes, points in detect_faces(np.stack(images), self.min_face_size, thresholds, self.networks):
            extra = [{"landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in p]} for p in points]
            out.append(RawDetections(boxes[:, :4], boxes[:, 4], np.zeros(len(boxes), np.int64), extra))
        return out


def _weights_file(folder: Path, net: str) -> Path:
    for name in (f"{net}.safetensors", f"{net}.pt"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsUnavailable(f"Weights for model 'mtcnn_faces': {folder} has no {net}.pt or {net}.safetensors; "
                             "the folder must hold pnet, rnet and onet state dicts.")


def _build_nets() -> dict[str, Any]:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    return {"pnet": PNet(pretrained=False), "rnet": RNet(pretrained=False), "onet": ONet(pretrained=False)}


@register_model("mtcnn_faces", task="detect", family="detection", weights=MTCNN_WEIGHTS, labels=FACE_LABELS,
                description="MTCNN face detector with 5 landmarks (facenet-pytorch weights, offline).")
def mtcnn_faces(spec: ModelSpec, weights_path: Path | None, device: str, dtype: str | None = None,
                min_face_size: int = 20,
                stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS) -> MTCNNFaceDetector:
    """``weights_path``: a folder with pnet/rnet/onet state dicts (None: seeded random nets)."""
    from ..backends.torch import TorchNetwork, torch_dtype

    tdtype = torch_dtype(dtype, device)
    nets = seeded(_build_nets)
    if weights_path is not None:
        folder = Path(weights_path)
        for name, net in nets.items():
            load_into(net, _weights_file(folder, name), spec.name)
    else:
        log.info("mtcnn_faces: seeded random weights")
    networks = {key: TorchNetwork(net, ["input"], NET_OUTPUTS[key], device=device, dtype=tdtype)
                for key, net in nets.items()}
    return MTCNNFaceDetector(spec, networks, device, min_face_size=min_face_size, stage_thresholds=stage_thresholds,
                             weights_path=weights_path)


def from_export(spec: ModelSpec, networks: dict[str, Network], config: dict[str, Any], folder: Path, device: str,
                min_face_size: int = 20, stage_thresholds: Sequence[float] = DEFAULT_STAGE_THRESHOLDS,
                **options: Any) -> MTCNNFaceDetector:
    """The ONNX runner: the same cascade over the export's pnet/rnet/onet graphs."""
    reject_options(spec, "onnx", options, ("min_face_size", "stage_thresholds"))
    return MTCNNFaceDetector(spec, networks, device, min_face_size=min_face_size, stage_thresholds=stage_thresholds,
                             weights_path=folder, export=config)

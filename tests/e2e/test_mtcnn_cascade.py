"""The batched MTCNN cascade (``detect_faces``) gives facenet-pytorch's own ``detect_face`` answer:
same boxes, scores and landmarks on real photos, batch 1 and 8, on PyTorch and on the ONNX
export, and its summed-area resize is torch's ``interpolate(mode="area")`` bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from facenet_pytorch.models.utils.detect_face import detect_face, imresample
from skimage import data

from vfm.models import load_model
from vfm.models.export import export_model
from vfm.models.families.mtcnn import NET_OUTPUTS, PYRAMID_FACTOR, SummedAreas, detect_faces, pyramid_scales

pytestmark = pytest.mark.e2e

SIDE = 512


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")


def padded(image: np.ndarray) -> np.ndarray:
    """``image`` cut or edge-padded to SIDE x SIDE, RGB."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[:SIDE, :SIDE]
    pad_y, pad_x = SIDE - image.shape[0], SIDE - image.shape[1]
    return np.pad(image, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode="edge")


def photos() -> list[np.ndarray]:
    """Eight real photos of one size: faces (the astronaut, mirrored, transposed, darker; the
    cameraman) and none (coffee, the cat, a micrograph)."""
    astronaut = data.astronaut()
    return [astronaut, np.ascontiguousarray(astronaut[:, ::-1]), padded(data.camera()), padded(data.coffee()),
            padded(data.chelsea()), data.immunohistochemistry(), np.ascontiguousarray(astronaut.transpose(1, 0, 2)),
            (astronaut // 2).astype(np.uint8)]


class FacenetNet:
    """A runner's network as facenet's ``detect_face`` calls it: a tensor in, a tuple of tensors out."""

    def __init__(self, network, outputs):
        self.network, self.outputs = network, list(outputs)

    def parameters(self):
        yield torch.empty(0, dtype=torch.float32)

    def __call__(self, x):
        out = self.network.run({"input": x.float().numpy()}, self.outputs)
        return tuple(torch.from_numpy(out[name]) for name in self.outputs)


def facenet_answer(images: np.ndarray, networks, thresholds):
    nets = [FacenetNet(networks[key], outputs) for key, outputs in NET_OUTPUTS.items()]
    with torch.inference_mode():
        boxes, points = detect_face(images, 20, *nets, thresholds, PYRAMID_FACTOR, "cpu")
    return [(np.asarray(b, np.float32).reshape(-1, 5), np.asarray(p, np.float32).reshape(-1, 5, 2))
            for b, p in zip(boxes, points, strict=True)]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    repository = tmp_path_factory.mktemp("model_repository")
    export_model("mtcnn_faces", repository)
    return {"torch": load_model("mtcnn_faces", device="cpu"),
            "onnx": load_model("mtcnn_faces", backend="onnx", device="cpu", repository=repository)}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("batch", [1, 8])
def test_the_batched_cascade_gives_facenets_answer(runners, backend, batch):
    images = np.stack(photos()[:batch])
    faces = 0
    # facenet's thresholds, then a last stage that keeps everything (many more boxes to compare)
    for thresholds in ([0.6, 0.7, 0.7], [0.6, 0.7, 0.0]):
        expected = facenet_answer(images, runners[backend].networks, thresholds)
        got = detect_faces(images, 20, thresholds, runners[backend].networks)
        assert len(got) == batch
        for (boxes, points), (ref_boxes, ref_points) in zip(got, expected, strict=True):
            assert boxes.shape == ref_boxes.shape and points.shape == ref_points.shape
            np.testing.assert_allclose(boxes, ref_boxes, rtol=0, atol=1e-4)
            np.testing.assert_allclose(points, ref_points, rtol=0, atol=1e-4)
            faces += len(boxes)
    assert faces >= batch  # the astronaut at least, and with the permissive threshold more


def test_summed_areas_resize_and_crop_as_torch_interpolate_area():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    as_float = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    areas = SummedAreas(images)
    # pyramid levels down and up (upsampling gives overlapping one- and two-pixel bins)
    for height, width in [(22, 32), (15, 22), (12, 12), (5, 9), (60, 90)]:
        expected = (imresample(as_float, (height, width)) - 127.5) * 0.0078125
        np.testing.assert_array_equal(areas.resize(height, width), expected.numpy())
    # crops of both images, larger and smaller than the output side, at the image's edges
    inds, y0, y1, x0, x1 = (np.array(v) for v in ([0, 1, 1, 0], [0, 5, 30, 0], [37, 20, 37, 3], [0, 40, 0, 7],
                                                  [53, 53, 11, 9]))
    got = areas.crops(inds, y0, y1, x0, x1, 24)
    for k in range(len(inds)):
        crop = as_float[inds[k]:inds[k] + 1, :, y0[k]:y1[k], x0[k]:x1[k]]
        np.testing.assert_array_equal(got[k], ((imresample(crop, (24, 24)) - 127.5) * 0.0078125)[0].numpy())


def test_pyramid_is_facenets():
    # 480x640, faces from 20 pixels: ten levels from 0.6 down by 0.709
    scales = pyramid_scales(480, 640, 20)
    assert len(scales) == 10 and scales[0] == pytest.approx(0.6) and scales[1] == pytest.approx(0.6 * 0.709)
    assert pyramid_scales(11, 400, 12) == []

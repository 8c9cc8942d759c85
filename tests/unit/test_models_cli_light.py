"""`vfm models list` and `vfm models info` answer from registry metadata: no network library is imported.

Each case runs the real command line in a fresh interpreter and then looks at ``sys.modules``,
so an import of torch anywhere on the path (a family module, a label list, a package's cli.py)
fails here, not in a timing.
"""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "transformers", "segment_anything", "onnxruntime", "facenet_pytorch")

PROBE = """
import contextlib, io, json, sys
from vfm.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(),
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def run_cli(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ("models", "list"),
    ("models", "list", "sam_*"),
    ("models", "list", "--task", "detect", "--json"),
    ("models", "info", "efficientnet_lite0"),
    ("models", "info", "sam_vit_b", "--json"),
    ("--help",),
])
def test_listing_and_describing_models_imports_no_network_library(argv):
    if argv == ("--help",):
        done = subprocess.run([sys.executable, "-c", "import sys\nfrom vfm.cli import build_parser\nbuild_parser()\n"
                               f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
        return
    result = run_cli(*argv)
    assert result["code"] == 0 and result["out"]
    assert result["heavy"] == []


def test_listing_shows_every_model_with_its_metadata():
    result = run_cli("models", "list", "--json")
    specs = {spec["name"]: spec for spec in json.loads(result["out"])}
    assert result["heavy"] == []
    # the metadata that needs torchvision's label lists and weights enums is there without torchvision
    assert specs["resnet50"]["num_labels"] == 1000 and specs["resnet50"]["preprocess"]["size"] == 224
    assert specs["fasterrcnn_resnet50_fpn_v2"]["num_labels"] == 91
    assert specs["sam_vit_b"]["weights"].startswith("https://dl.fbaipublicfiles.com/segment_anything/")
    assert {"tiny_cnn", "tiny_vit", "tiny_detector", "tiny_sam", "mtcnn_faces", "dinov2_small"} <= set(specs)

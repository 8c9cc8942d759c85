"""int8 / float16 variants of an export (`vfm export --quantize int8`, `--dtype float16`): where they go,
what they record, how they are served, and the exports that are refused with nothing written."""
import json

import numpy as np
import onnx
import pytest

from vfm.cli import main
from vfm.models import load_model
from vfm.models.export import ExportNotFound, QuantizationRefused, VariantOptions, export_model
from vfm.models.export.common import ExportError, parity_images


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_repository")
    export_model("tiny_cnn", root, variant=VariantOptions(dtype="float16"))
    return root


@pytest.fixture(scope="module")
def images():
    return parity_images(seed=5, sizes=[(50, 70), (90, 40), (64, 64)])


def test_a_float16_export_is_its_own_folder_with_float32_io_and_half_weights(half):
    assert sorted(p.name for p in half.iterdir()) == ["tiny_cnn.float16"]
    config = json.loads((half / "tiny_cnn.float16" / "config.json").read_text())
    assert config["dtype"] == "float16" and config["float16"]["keep_io_types"] is True
    graph = config["graphs"]["model"]
    assert [(t["name"], t["dtype"]) for t in graph["inputs"] + graph["outputs"]] == [
        ("input", "float32"), ("features", "float32"), ("logits", "float32")]
    model = onnx.load(str(half / "tiny_cnn.float16" / "1" / "model.onnx"))
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer if t.dims}
    assert kinds == {np.dtype(np.float16)}
    parity = config["check"]["float16_parity"]
    assert parity["logits_max_abs_diff"] <= parity["tolerance"]["atol"] + parity["tolerance"]["rtol"] * parity[
        "logits_scale"]


def test_the_float16_export_runs_on_cpu_and_matches_float32_loosely(half, images, tmp_path):
    export_model("tiny_cnn", tmp_path)
    reference = load_model("tiny_cnn", backend="onnx", device="cpu", repository=tmp_path)
    runner = load_model("tiny_cnn", backend="onnx", device="cpu", repository=half, dtype="float16")
    assert runner.info()["onnx"]["folder"] == str(half / "tiny_cnn.float16")
    np.testing.assert_allclose(runner.embed(images), reference.embed(images), atol=2e-2, rtol=2e-2)
    got, want = runner.classify(images, top_k=3), reference.classify(images, top_k=3)
    for g, w in zip(got, want):
        assert [t.score for t in g.top] == pytest.approx([t.score for t in w.top], abs=1e-2)


def test_a_missing_variant_names_the_command_that_makes_it(half):
    with pytest.raises(ExportNotFound, match=r"`vfm export tiny_cnn --quantize int8 --out "):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=half, quantize="int8")
    with pytest.raises(ValueError, match="quantize 'int4' is not known"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=half, quantize="int4")


def test_int8_of_random_weights_is_refused_as_uncheckable_and_nothing_is_written(tmp_path, capsys):
    """A random network is sure of no photo, so there is no answer to keep: refused, not published."""
    assert main(["export", "tiny_cnn", "--quantize", "int8", "--repository", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("vfm: error: only 0 of the 57 check photo views"), err
    assert "are the weights random?" in err[1]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantizationRefused):
        export_model("tiny_cnn", tmp_path, variant=VariantOptions(quantize="int8"))
    assert list(tmp_path.iterdir()) == []


def test_a_detectors_int8_is_checked_on_matched_boxes(tmp_path, capsys):
    """tiny_detector (seeded weights, over a thousand boxes on the photos): dynamic int8 matches about 92% of
    float32's clear boxes. Refused at the default 95% with nothing written; published at --min-agreement 0.9,
    with the counts in config.json and the printed report, and served."""
    with pytest.raises(QuantizationRefused, match=r"matches \d+ of \d+ clear float32 boxes at IoU >= 0.7"):
        export_model("tiny_detector", tmp_path, variant=VariantOptions(quantize="int8"))
    assert list(tmp_path.iterdir()) == []
    assert main(["export", "tiny_detector", "--quantize", "int8", "--min-agreement", "0.9",
                 "--repository", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    check = json.loads((tmp_path / "tiny_detector.int8" / "config.json").read_text())["check"]
    assert check["clear_boxes"] > 100 and 0.9 <= check["box_agreement"] < 0.95
    assert check["matched"] + check["missed"] + check["extra"] == check["clear_boxes"]
    assert f"{check['matched']} of {check['clear_boxes']} clear boxes matched at IoU >= 0.7" in out
    runner = load_model("tiny_detector", backend="onnx", device="cpu", repository=tmp_path, quantize="int8")
    assert runner.info()["onnx"]["folder"] == str(tmp_path / "tiny_detector.int8")
    assert runner.detect(parity_images(2, [(120, 160)]))[0].image_size == (120, 160)


def test_box_matching_is_greedy_by_score_and_by_label():
    from vfm.models.export.task_checks import box_iou, box_match
    from vfm.models.results import Detection, Detections

    def dets(*rows):
        return Detections([Detection(box=list(b), score=s, label=l) for b, s, l in rows], (100, 100))

    a = [0, 0, 10, 10]
    shifted = [1, 0, 11, 10]  # IoU 9/11 with a
    assert box_iou([a], [shifted])[0, 0] == pytest.approx(9 / 11)
    ref = dets((a, 0.9, "face"), ([50, 50, 60, 60], 0.8, "face"), ([20, 20, 30, 30], 0.55, "face"))
    got = dets((shifted, 0.85, "face"), ([50, 50, 60, 60], 0.7, "cat"), ([70, 70, 80, 80], 0.95, "face"))
    m = box_match(ref, got, min_iou=0.8, clear=0.6)
    # a matches shifted; the second box has the wrong label (missed); the third is not clear (not counted);
    # the variant's box at 70 matches nothing and is clear (extra); its "cat" box is clear and unmatched (extra)
    assert (m["matched"], m["missed"], m["extra"]) == (1, 1, 2)
    assert m["ious"] == [pytest.approx(9 / 11)] and m["score_diffs"] == [pytest.approx(0.05)]
    assert box_match(ref, got, min_iou=0.9, clear=0.6)["matched"] == 0


def test_bad_variant_options_are_usage_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--repository", str(tmp_path / "repo")]
    cases = [
        (["--quantize", "int8", "--calibration", str(tmp_path / "nope")], "is not a folder of images"),
        (["--quantize", "int8", "--calibration", str(empty)], "holds no image files"),
        (["--quantize", "int8", "--dtype", "float16"], "not both"),
        (["--calibration", str(tmp_path)], "--calibration is for --quantize int8"),
        (["--quantize", "int8", "--min-agreement", "1.5"], "min_agreement must be from 0 to 1"),
        (["--quantize", "int8", "--match-iou", "0"], "min_iou must be above 0"),
        (["--dtype", "float16", "--check-images", str(tmp_path / "nope")], "--check-images"),
    ]
    for flags, message in cases:
        assert main(["export", "tiny_cnn", *flags, *out]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (flags, err)
    assert not (tmp_path / "repo").exists()


def test_service_config_serves_the_variants_on_onnx_only():
    from vfm.service.config import ConfigError, parse_config
    from vfm.service.deployments import runner_options

    cfg = parse_config({"models": {"a": {"model": "tiny_cnn", "backend": "onnx", "quantize": "int8"},
                                   "b": {"model": "tiny_cnn", "backend": "onnx", "dtype": "float16"}}})
    assert runner_options(cfg, "a")["quantize"] == "int8"
    assert runner_options(cfg, "b")["dtype"] == "float16"
    with pytest.raises(ConfigError, match="quantize: int8 needs backend: onnx"):
        parse_config({"models": {"tiny_cnn": {"quantize": "int8"}}})
    with pytest.raises(ConfigError, match="quantize"):
        parse_config({"models": {"tiny_cnn": {"backend": "onnx", "quantize": "int4"}}})


def test_predict_quantize_goes_with_onnx_and_names_the_export_to_make(half, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(parity_images(1, [(60, 80)])[0]).save(photo)
    assert main(["predict", "tiny_cnn", str(photo), "--quantize", "int8"]) == 2
    assert "--quantize int8 runs an int8 ONNX export: it goes with --backend onnx" in capsys.readouterr().err
    assert main(["predict", "tiny_cnn", str(photo), "--backend", "onnx", "--quantize", "int8",
                 "--repository", str(half)]) == 2
    err = capsys.readouterr().err
    assert f"run `vfm export tiny_cnn --quantize int8 --repository {half}` first" in err


def test_what_a_float16_graph_declares_is_checked_when_the_cpu_cannot_run_it(half, tmp_path):
    """The fallback when ONNX Runtime's CPU build lacks a float16 kernel: checker, strict shape
    inference and the same IO as float32; a graph that declares other IO fails."""
    from vfm.models.export.common import ParityError
    from vfm.models.export.quantize import check_declared_io

    export_model("tiny_cnn", tmp_path)
    float_path, half_path = tmp_path / "tiny_cnn" / "1" / "model.onnx", half / "tiny_cnn.float16" / "1" / "model.onnx"
    assert check_declared_io(float_path, half_path) == {"declared_io": "same as float32",
                                                        "io": ["input", "features", "logits"]}
    model = onnx.load(str(half_path))
    model.graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16  # logits declared half
    broken = tmp_path / "broken.onnx"
    onnx.save_model(model, str(broken))
    with pytest.raises(ParityError):
        check_declared_io(float_path, broken)

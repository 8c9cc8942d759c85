"""`vfm export NAME`: writes the repository, prints parity, fails with exit 1 and one line when parity fails."""
import json

from vfm.cli import main


def test_export_writes_the_repository_and_prints_the_config(tmp_path, capsys):
    assert main(["export", "tiny_cnn", "--out", str(tmp_path), "--opset", "15", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["name"] == "tiny_cnn" and config["opset"] == 15
    assert (tmp_path / "tiny_cnn" / "1" / "model.onnx").is_file()
    assert json.loads((tmp_path / "tiny_cnn" / "config.json").read_text()) == config


def test_export_summary_names_files_and_parity(tmp_path, capsys):
    assert main(["export", "tiny_cnn", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"exported tiny_cnn -> {tmp_path / 'tiny_cnn'}" in out
    assert "model.onnx" in out and "logits_max_abs_diff=" in out


def test_a_failed_parity_is_exit_1_with_one_line_and_no_files(tmp_path, capsys):
    assert main(["export", "tiny_vit", "--out", str(tmp_path), "--atol", "0", "--rtol", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "exporting tiny_vit and checking it against PyTorch ..."
    assert len(err) == 2 and err[1].startswith("vfm: error: parity: tokens differs")
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_exit_2(tmp_path, capsys):
    assert main(["export", "no_such_model", "--out", str(tmp_path)]) == 2
    assert "Unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["export", "tiny_cnn", "--out", str(tmp_path), "--opset", "99"]) == 2
    assert "opset must be" in capsys.readouterr().err
    assert main(["export", "tiny_cnn", "--out", str(tmp_path), "--min-score", "0.1"]) == 1
    assert "does not take option(s) min_score" in capsys.readouterr().err

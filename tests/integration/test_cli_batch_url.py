"""The CLI against the live service: `vfm predict --url` over a folder (concurrent, in input order),
`--draw` on the server's answers, and `vfm heads list | predict --url` answering as in-process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfm.cli import main
from vfm.service.client import VfmClient


@pytest.fixture
def photo_folder(tmp_path: Path, chelsea_jpeg: bytes, astronaut_jpeg: bytes, random_pngs) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_chelsea.jpg").write_bytes(chelsea_jpeg)
    (folder / "b_astronaut.jpg").write_bytes(astronaut_jpeg)
    for i, data in enumerate(random_pngs(7, seed=5)):
        (folder / f"c_noise{i}.png").write_bytes(data)
    return folder


def test_predict_url_over_a_folder_answers_in_input_order_as_the_local_run(service_url: str, photo_folder: Path,
                                                                          capsys) -> None:
    assert main(["predict", "tiny_cnn", str(photo_folder), "--top-k", "2", "--jsonl"]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (photo_folder / "d_notes.jpg").write_text("not an image")
    assert main(["predict", "--url", service_url, "tiny_cnn", str(photo_folder), "--top-k", "2", "--jsonl",
                 "--concurrency", "3"]) == 1
    captured = capsys.readouterr()
    remote = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["image"] for r in remote] == [r["image"] for r in local] + [str(photo_folder / "d_notes.jpg")]
    for r, l in zip(remote, local):
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in l["predictions"]]
        assert np.allclose([p["score"] for p in r["predictions"]], [p["score"] for p in l["predictions"]], atol=1e-4)
    assert "415" in remote[-1]["error"] and "not_an_image" in remote[-1]["error"]
    # the server's warning (tiny_cnn is a random test model) is printed once, then the failed file
    assert captured.err.splitlines() == [f"vfm: warning: {remote[0]['warnings'][0]}",
                                         f"vfm: error: {remote[-1]['error']}", "vfm: 1 of 10 inputs failed"]


def test_draw_works_on_the_servers_answers(service_url: str, tmp_path: Path, astronaut_jpeg: bytes, capsys) -> None:
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg)
    out = tmp_path / "drawn"
    assert main(["predict", "--url", service_url, "mtcnn_faces", str(photo), "--draw", str(out), "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    x0, y0, x1, y1 = (int(v) for v in answer["detections"][0]["box"])
    drawn = np.asarray(Image.open(answer["drawn"]).convert("RGB"), np.int16)
    from vfm.models import decode_image

    diff = np.abs(drawn - decode_image(astronaut_jpeg).astype(np.int16)).max(axis=2) > 0
    assert diff[y0 + 1, x0 + 5: x1 - 5].mean() > 0.9 and not diff[y1 + 10:, :].any()


def test_heads_predict_url_answers_with_the_label_of_the_in_process_head(service_url: str, client: VfmClient,
                                                                        heads: Path, api_key: str, tmp_path: Path,
                                                                        random_pngs, capsys) -> None:
    from vfm.models.heads import KNNHead, save_head

    images = random_pngs(3, seed=31)
    paths = []
    for i, data in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        Path(paths[-1]).write_bytes(data)
    features = np.asarray([client.embed("tiny_cnn", image)["embedding"] for image in images], np.float32)
    save_head(KNNHead(["first", "second", "third"], features, np.arange(3), k=1), heads / "cli_knn",
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    client.http.post("/v1/admin/heads/reload", headers={"Authorization": f"Bearer {api_key}"}).raise_for_status()

    assert main(["heads", "list", "--url", service_url, "--json"]) == 0
    assert [h["name"] for h in json.loads(capsys.readouterr().out)] == ["cli_knn"]
    assert main(["heads", "predict", "cli_knn", *paths, "--heads-dir", str(heads), "--jsonl", "--top-k", "2"]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["heads", "predict", "--url", service_url, "cli_knn", *paths, "--jsonl", "--top-k", "2"]) == 0
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["predictions"][0]["label"] for r in remote] == ["first", "second", "third"]
    assert [[p["label"] for p in r["predictions"]] for r in remote] == \
        [[p["label"] for p in r["predictions"]] for r in local]

    assert main(["predict", "--url", service_url, "cli_knn", paths[0]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'cli_knn' is a head" in err and f"vfm heads predict --url {service_url}" in err

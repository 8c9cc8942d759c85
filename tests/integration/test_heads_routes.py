"""Heads served over their backbone: a head folder dropped into heads_dir serves after a reload."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vfm.models.heads import KNNHead, save_head
from vfm.service.client import VfmClient


def test_a_knn_head_over_tiny_cnn_names_each_training_image(client: VfmClient, heads: Path, api_key: str,
                                                            random_pngs) -> None:
    images = random_pngs(3, seed=21)
    features = np.asarray([client.embed("tiny_cnn", image)["embedding"] for image in images], np.float32)
    labels = ["first", "second", "third"]
    save_head(KNNHead(labels, features, np.arange(3), k=1, metric="cosine"), heads / "tiny_knn",
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    (heads / "broken").mkdir()
    (heads / "broken" / "head.json").write_text("{not json")

    assert client.heads() == []  # nothing changes until the reload
    report = client.http.post("/v1/admin/heads/reload", headers={"X-API-Key": api_key}).json()
    assert (report["loaded"], report["invalid"]) == (1, 1)
    listed = {h["name"]: h for h in client.heads()}
    assert listed["tiny_knn"]["status"] == "ready" and listed["tiny_knn"]["backbone"] == "tiny_cnn"
    assert listed["broken"]["status"] == "invalid" and str(heads / "broken") in listed["broken"]["reason"]

    alone = []
    for image, label, transport in zip(images, labels, ("multipart", "json", "raw")):
        answer = client.head_predict("tiny_knn", image, top_k=1, transport=transport)
        assert answer["head"] == "tiny_knn" and answer["backbone"] == "tiny_cnn"
        assert answer["predictions"][0]["label"] == label
        assert answer["warnings"] == ["model 'tiny_cnn' runs with random weights (a seeded test model, tiny_cnn): "
                                      "its answers are meaningless"]   # the backbone's: a test network
        alone.append(answer)
    # The three images in one request: the backbone embeds them together, each answer as alone.
    files = [("images", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    together = client.http.post("/v1/heads/tiny_knn/predict", files=files, data={"top_k": "1"})
    assert together.status_code == 200, together.text
    assert together.json()["results"] == alone and together.json()["head"] == "tiny_knn"

    broken = client.send("POST", "/v1/heads/broken/predict", images[0])
    assert broken.status_code == 503 and broken.json()["error"]["type"] == "head_unavailable"


def test_a_published_fashion_mnist_head_answers_as_in_process(client: VfmClient, heads: Path, api_key: str,
                                                              tmp_path: Path) -> None:
    """`vfm finetune train` on Fashion-MNIST with efficientnet_lite0 features, `publish` into the service's
    heads folder, reload: the head's HTTP answers equal the in-process head on the backbone's embed()."""
    import io

    from PIL import Image

    from vfm.finetune.data import read_idx_file
    from vfm.models import decode_image, load_model
    from vfm.models.heads import load_head
    from vfm.cli import main as vfm

    run = tmp_path / "run"
    assert vfm(["finetune", "train", "--backbone", "efficientnet_lite0", "--data",
                "idx:/usr/share/datasets/fashion-mnist", "--limit", "150", "--head", "mlp", "--hidden", "64",
                "--epochs", "5", "--lr", "0.03", "--out", str(run), "--cache-dir", str(tmp_path / "cache"),
                "--device", "cpu", "--quiet"]) == 0
    assert vfm(["finetune", "publish", str(run), "--to", str(heads), "--name", "fashion_mlp"]) == 0
    client.http.post("/v1/admin/heads/reload", headers={"Authorization": f"Bearer {api_key}"}).raise_for_status()
    listed = {h["name"]: h for h in client.heads()}
    assert listed["fashion_mlp"]["status"] == "ready" and listed["fashion_mlp"]["backbone"] == "efficientnet_lite0"

    pixels = read_idx_file(next(Path("/usr/share/datasets/fashion-mnist").glob("t10k-images*")))[:6]
    pngs = []
    for grey in pixels:
        buf = io.BytesIO()
        Image.fromarray(grey).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    head, meta = load_head(heads / "fashion_mlp")
    backbone = load_model("efficientnet_lite0", device="cpu")
    features = backbone.embed([decode_image(p) for p in pngs], normalize=meta["embed"]["normalize"])
    local = head.classify(features, top_k=3)
    for png, expected in zip(pngs, local):
        answer = client.head_predict("fashion_mlp", png, top_k=3)["predictions"]
        assert [p["label"] for p in answer] == [t.label for t in expected.top]
        assert np.allclose([p["score"] for p in answer], [t.score for t in expected.top], atol=1e-4)

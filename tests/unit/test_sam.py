"""The SAM family through tiny_sam (seeded random, 256-pixel input) and a random-init sam_vit_b.

segment-anything's own ``SamPredictor`` on the same network is the reference for what one
prompt on one image must give.
"""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from vfm.models.backends.torch import DeviceUnavailable
from vfm.models.masks import decode_rle, encode_rle, mask_to_json
from vfm.models.registry import get_spec, list_models
from vfm.models.results import ImageEmbedding, Prompt
from vfm.models import load_model
from vfm.models.weights import WeightsUnavailable

WIDE = (48, 80)   # (height, width)
TALL = (120, 50)


def _image(size, seed):
    """A smooth gradient plus noise, so the encoder sees structure rather than pure noise."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def point(x, y, label=1, multimask=False):
    return Prompt(points=np.array([[x, y]], float), point_labels=np.array([label]), multimask=multimask)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_sam", device="cpu")


@pytest.fixture(scope="module")
def wide_embedding(tiny):
    return tiny.encode([_image(WIDE, 0)])[0]


def _mixed_prompts():
    return [
        Prompt(box=np.array([5.0, 4.0, 60.0, 40.0])),
        point(10, 20, multimask=True),
        Prompt(points=np.array([[30.0, 20.0], [50.0, 10.0]]), point_labels=np.array([1, 0]),
               box=np.array([20.0, 5.0, 70.0, 45.0])),
        Prompt(points=np.array([[70.0, 40.0], [5.0, 5.0], [40.0, 25.0]]), point_labels=np.array([1, 0, 1]),
               multimask=True),
    ]


def test_encode_records_sizes_and_segment_returns_masks_at_the_original_size(tiny):
    for size in (WIDE, TALL):
        emb = tiny.encode([_image(size, 1)])[0]
        assert emb.original_size == size
        assert max(emb.input_size) == 256  # longest side resized to the encoder's input
        assert tuple(emb.features.shape) == (1, 256, 16, 16)
        h, w = size
        multi, single = tiny.segment(emb, [point(w / 3, h / 2, multimask=True), point(w / 3, h / 2)])
        assert multi.masks.shape == (3, h, w) and multi.masks.dtype == bool
        assert multi.scores.shape == (3,) and multi.low_res_logits.shape == (3, 64, 64)
        assert single.masks.shape == (1, h, w) and single.scores.shape == (1,)


def test_segment_equals_segment_anythings_predictor(tiny, wide_embedding):
    image = _image(WIDE, 0)
    predictor = SamPredictor(tiny.model)
    predictor.set_image(image)
    for prompt, got in zip(_mixed_prompts(), tiny.segment(wide_embedding, _mixed_prompts())):
        masks, scores, logits = predictor.predict(prompt.points, prompt.point_labels, prompt.box,
                                                  multimask_output=prompt.multimask)
        np.testing.assert_array_equal(got.masks, masks)
        np.testing.assert_allclose(got.scores, scores, atol=1e-5)
        np.testing.assert_allclose(got.low_res_logits, logits, atol=1e-4)


def test_prompts_batched_in_one_call_equal_one_by_one(tiny, wide_embedding):
    prompts = _mixed_prompts()
    together = tiny.segment(wide_embedding, prompts)
    assert len(together) == len(prompts)
    for prompt, got in zip(prompts, together):
        alone = tiny.segment(wide_embedding, [prompt])[0]
        np.testing.assert_array_equal(got.masks, alone.masks)
        np.testing.assert_allclose(got.low_res_logits, alone.low_res_logits, atol=1e-5)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-6)


def test_encode_batch_of_different_sizes_equals_one_by_one(tiny):
    images = [_image(WIDE, 2), _image(TALL, 3)]
    batched = tiny.encode(images)
    for image, got in zip(images, batched):
        alone = tiny.encode([image])[0]
        assert (got.original_size, got.input_size) == (alone.original_size, alone.input_size)
        torch.testing.assert_close(got.features, alone.features, atol=1e-5, rtol=1e-5)
    assert batched[0].input_size == (154, 256) and batched[1].input_size == (256, 107)


def test_masks_round_trip_through_coco_rle(tiny, wide_embedding):
    result = tiny.segment(wide_embedding, [point(10, 20, multimask=True), Prompt(box=np.array([5.0, 4, 60, 40]))])
    masks = np.concatenate([r.masks for r in result])
    areas = masks.sum(axis=(1, 2))
    assert np.any((areas > 0) & (areas < masks[0].size))  # the round trip is checked on real shapes
    for mask in masks:
        rle = encode_rle(mask)
        assert rle["size"] == list(WIDE)
        np.testing.assert_array_equal(decode_rle(rle), mask)
        assert mask_to_json(mask, 0.5)["area"] == int(mask.sum())
    answer = result[0].to_json()
    assert [m["area"] for m in answer["masks"]] == [int(a) for a in areas[:3]]


@pytest.mark.parametrize("prompt, message", [
    (Prompt(), "at least one point or a box"),
    (Prompt(points=np.array([[1.0, 2.0]])), "need point_labels"),
    (Prompt(points=np.array([[1.0, 2.0]]), point_labels=np.array([2])), "1 \\(foreground\\) or 0"),
    (Prompt(points=np.array([[1.0, 2.0], [3, 4]]), point_labels=np.array([1])), "1 point_labels for 2 points"),
    (Prompt(points=np.array([1.0, 2.0, 3.0]), point_labels=np.array([1])), "\\[x, y\\] pairs"),
    (Prompt(points=np.array([[np.nan, 2.0]]), point_labels=np.array([1])), "finite"),
    (Prompt(points=[["a", "b"]], point_labels=[1]), "must be numbers"),
    (Prompt(points=np.array([[10.0, 70.0]]), point_labels=np.array([1])), "outside the 80x48"),
    (Prompt(box=np.array([10.0, 5.0, 10.0, 30.0])), "x0 < x1"),
    (Prompt(box=np.array([10.0, 30.0, 20.0, 5.0])), "y0 < y1"),
    (Prompt(box=np.array([0.0, 0.0, np.inf, 30.0])), "finite"),
    (Prompt(box=np.array([1.0, 2.0, 3.0])), "\\[x0, y0, x1, y1\\]"),
    (Prompt(box=np.array([100.0, 5.0, 120.0, 30.0])), "no part on the 80x48"),
])
def test_bad_prompts_raise_value_error(tiny, wide_embedding, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny.segment(wide_embedding, [point(10, 10), prompt])


def test_boxes_are_clipped_to_the_image(tiny, wide_embedding):
    h, w = WIDE
    spilled, inside = tiny.segment(wide_embedding, [Prompt(box=np.array([-10.0, -5.0, w + 10, h + 3])),
                                                    Prompt(box=np.array([0.0, 0.0, w, h]))])
    np.testing.assert_array_equal(spilled.masks, inside.masks)
    np.testing.assert_allclose(spilled.low_res_logits, inside.low_res_logits, atol=1e-6)


def test_an_embedding_that_does_not_fit_is_refused(tiny, wide_embedding):
    with pytest.raises(ValueError, match="made by 'sam_vit_b'"):
        tiny.segment(ImageEmbedding(wide_embedding.features, WIDE, (154, 256), model="sam_vit_b"), [point(1, 1)])
    with pytest.raises(ValueError, match="shape"):
        tiny.segment(ImageEmbedding(torch.zeros(1, 256, 64, 64), WIDE, (154, 256)), [point(1, 1)])
    with pytest.raises(ValueError, match="does not match its original_size"):
        tiny.segment(ImageEmbedding(wide_embedding.features, WIDE, (256, 256)), [point(1, 1)])


def test_tiny_sam_is_seeded_and_loads_a_checkpoint(tiny, tmp_path):
    again = load_model("tiny_sam", device="cpu")
    state = tiny.model.state_dict()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "tiny_sam.pth"
    torch.save(changed, path)
    loaded = load_model("tiny_sam", device="cpu", weights=str(path))
    assert loaded.weights_path == path
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in changed.items())
    from_folder = load_model("tiny_sam", device="cpu", weights=str(tmp_path))  # a folder holding one checkpoint
    assert torch.equal(from_folder.model.mask_decoder.iou_token.weight, changed["mask_decoder.iou_token.weight"])
    del changed["mask_decoder.iou_token.weight"]
    torch.save(changed, path)
    with pytest.raises(WeightsUnavailable, match="1 missing tensors \\(mask_decoder.iou_token.weight\\)"):
        load_model("tiny_sam", device="cpu", weights=str(path))


def test_options_and_warmup(tiny):
    with pytest.raises(DeviceUnavailable, match="float16 needs a CUDA device"):
        load_model("tiny_sam", device="cpu", dtype="float16")
    tiny.warmup()
    assert tiny.info()["embedding_shape"] == [256, 16, 16]
    assert tiny.encode([]) == [] and tiny.segment(tiny.encode([_image(WIDE, 4)])[0], []) == []


def test_sam_vit_b_random_init_has_the_official_shape_and_decodes():
    spec = get_spec("sam_vit_b")
    assert spec.weights.url.endswith("/segment_anything/sam_vit_b_01ec64.pth") and len(spec.weights.sha256) == 64
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny_sam"} <= set(list_models("*sam*", task="segment"))
    runner = load_model("sam_vit_b", device="cpu", weights="random")
    encoder = runner.model.image_encoder
    assert encoder.img_size == 1024 and encoder.patch_embed.proj.out_channels == 768
    assert len(encoder.blocks) == 12 and encoder.blocks[0].attn.num_heads == 12
    assert [i for i, block in enumerate(encoder.blocks) if block.window_size == 0] == [2, 5, 8, 11]
    assert runner.embedding_shape == (256, 64, 64)
    # The 1024-pixel encoder takes ~24 s on this CPU; the decoder runs on a random embedding.
    emb = ImageEmbedding(torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0)),
                         original_size=(480, 640), input_size=(768, 1024), model="sam_vit_b")
    multi, single = runner.segment(emb, [point(100, 200, multimask=True), Prompt(box=np.array([10.0, 20, 300, 400]))])
    assert multi.masks.shape == (3, 480, 640) and multi.low_res_logits.shape == (3, 256, 256)
    assert single.masks.shape == (1, 480, 640) and single.scores.shape == (1,)


def test_offline_without_the_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_OFFLINE", "1")
    monkeypatch.setenv("VFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable) as err:
        load_model("sam_vit_b", device="cpu")
    assert str(tmp_path / "cache" / "sam_vit_b" / "sam_vit_b_01ec64.pth") in str(err.value)

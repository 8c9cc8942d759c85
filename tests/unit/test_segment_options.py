"""The segment route's options: prompts, or `mode: everything` with the automatic mask generator's knobs."""
from __future__ import annotations

from typing import Any

import pytest

from vfm.models.families.sam_everything import EverythingOptions
from vfm.service.config import Limits
from vfm.service.errors import ApiError
from vfm.service.options import EVERYTHING_OPTIONS, SegmentOptions, coerce_text, parse_options

LIMITS = Limits(max_points_per_side=16)


def parse(raw: dict[str, Any], limits: Limits = LIMITS) -> SegmentOptions:
    options = parse_options(SegmentOptions, raw, limits)
    assert isinstance(options, SegmentOptions)
    return options


def test_everything_takes_no_prompt_and_passes_only_the_options_given() -> None:
    options = parse({"mode": "everything", "image_id": "a" * 64, "pred_iou_thresh": 0.5, "min_mask_area": 100,
                     "max_masks": 20, "format": "polygons"})
    assert options.everything_options() == {"points_per_side": 16, "pred_iou_thresh": 0.5, "min_mask_area": 100,
                                            "max_masks": 20}  # the default 32 per side, held to the limit of 16
    EverythingOptions(**options.everything_options())  # what the replica builds from them
    assert parse({"mode": "everything", "points_per_side": 8}).everything_options() == {"points_per_side": 8}
    assert parse({"mode": "everything"}, Limits()).points_per_side == EverythingOptions().points_per_side
    assert set(EVERYTHING_OPTIONS) <= set(EverythingOptions.__dataclass_fields__)


def test_form_fields_arrive_as_text() -> None:
    raw = {k: coerce_text(v) for k, v in {"mode": "everything", "points_per_side": "4", "nms_thresh": "0.5"}.items()}
    assert parse(raw).everything_options() == {"points_per_side": 4, "nms_thresh": 0.5}


@pytest.mark.parametrize("raw, message", [
    ({"mode": "everything", "points": [[1, 2]], "point_labels": [1]}, "`mode: everything` takes no prompt"),
    ({"mode": "everything", "prompts": [{"box": [0, 0, 5, 5]}]}, "`mode: everything` takes no prompt"),
    ({"mode": "everything", "multimask": True}, "`mode: everything` takes no prompt"),
    ({"points": [[1, 2]], "point_labels": [1], "points_per_side": 8}, "`points_per_side` only apply with `mode: e"),
    ({"mode": "everything", "points_per_side": 17}, "points_per_side: 17 is above this service's limit of 16"),
    ({"mode": "everything", "points_per_side": 0}, "points_per_side: Input should be greater than or equal to 1"),
    ({"mode": "everything", "pred_iou_thresh": 1.5}, "pred_iou_thresh: Input should be less than or equal to 1"),
    ({"mode": "everything", "stability_score_thresh": -1}, "stability_score_thresh: Input should be greater"),
    ({"mode": "everything", "nms_thresh": float("nan")}, "nms_thresh:"),
    ({"mode": "everything", "min_mask_area": -5}, "min_mask_area: Input should be greater than or equal to 0"),
    ({"mode": "everything", "max_masks": 0}, "max_masks: Input should be greater than or equal to 1"),
    ({"mode": "all"}, "mode: Input should be 'prompts' or 'everything'"),
    ({"mode": "everything", "points_per_batch": 8}, "points_per_batch: unknown option"),
])
def test_bad_everything_options_are_422_naming_the_option(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError) as error:
        parse(raw)
    assert error.value.status == 422 and message in error.value.message

"""Request options per route (pydantic), and their limits from the config.

Options arrive as JSON fields, multipart form fields or query parameters; form and query
values are text, so ``coerce_text`` reads ``5``, ``true`` and ``[[10, 20]]`` as JSON first.
Unknown options are refused (422) with the close names, like unknown config keys.
"""
from __future__ import annotations

import difflib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import Limits
from .errors import ApiError, invalid_options

IMAGE_ID_PATTERN = r"^[0-9a-f]{64}$"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def check_limits(self, limits: Limits) -> None:
        """Raise ``invalid_options`` when an option is beyond the service's limits."""

    def runner_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class ClassifyOptions(Options):
    top_k: int = Field(5, ge=1, description="how many classes to return, best first")

    def check_limits(self, limits: Limits) -> None:
        if self.top_k > limits.max_top_k:
            raise invalid_options(f"top_k: {self.top_k} is above this service's limit of {limits.max_top_k}.")


class DetectOptions(Options):
    score_threshold: float = Field(0.5, ge=0, le=1, description="drop detections scored below this")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="non-maximum suppression overlap")
    max_detections: int = Field(100, ge=1, description="keep at most this many, best first")

    def check_limits(self, limits: Limits) -> None:
        if self.max_detections > limits.max_detections:
            raise invalid_options(f"max_detections: {self.max_detections} is above this service's limit of "
                                  f"{limits.max_detections}.")


class EmbedOptions(Options):
    normalize: bool = Field(False, description="scale the vector to unit L2 norm")


class EncodeOptions(Options):
    """``encode`` takes no options."""


class PromptOptions(BaseModel):
    """One SAM prompt: points with labels, and/or a box, in pixels of the original image."""

    model_config = ConfigDict(extra="forbid")

    points: list[tuple[float, float]] | None = Field(None, description="[[x, y], ...]", examples=[[[200, 150]]])
    point_labels: list[Literal[0, 1]] | None = Field(None, description="1 foreground, 0 background; one per point")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]")
    multimask: bool = Field(False, description="three candidate masks instead of one")

    @model_validator(mode="after")
    def _complete(self) -> "PromptOptions":
        _check_prompt(self.points, self.point_labels, self.box)
        return self


def _check_prompt(points: list | None, point_labels: list | None, box: tuple | None) -> None:
    if not points and box is None:
        raise ValueError("a prompt needs `points` (with `point_labels`) or a `box`")
    if points and point_labels is None:
        raise ValueError("`points` need `point_labels` (1 foreground, 0 background), one per point")
    if points is not None and point_labels is not None and len(points) != len(point_labels):
        raise ValueError(f"{len(point_labels)} point_labels for {len(points)} points; give one label per point")


EVERYTHING_OPTIONS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "nms_thresh", "min_mask_area",
                      "max_mask_fraction", "max_masks")


class SegmentOptions(Options):
    """A single prompt (``points``/``point_labels``/``box``/``multimask``) or a list of ``prompts``; or, with
    ``mode: everything``, no prompt: every object found from a grid of points (segment-anything's
    automatic mask generator), tuned by the options of ``EVERYTHING_OPTIONS`` (defaults: the library's)."""

    image_id: str | None = Field(None, pattern=IMAGE_ID_PATTERN,
                                 description="sha256 of an image already sent to encode or segment")
    points: list[tuple[float, float]] | None = Field(None, description="[[x, y], ...]")
    point_labels: list[Literal[0, 1]] | None = Field(None, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1]")
    multimask: bool = False
    prompts: list[PromptOptions] | None = Field(None, description="several prompts on the same image")
    format: Literal["rle", "png", "polygons"] = Field("rle", description="COCO RLE, base64 PNG or polygons")
    mode: Literal["prompts", "everything"] = Field(
        "prompts", description="`everything`: no prompt; every object, from a grid of points, largest first")
    points_per_side: int | None = Field(None, ge=1, description="everything: the grid has this many points per "
                                        "side (default 32; the service's limits.max_points_per_side caps it)")
    pred_iou_thresh: float | None = Field(None, ge=0, le=1, description="everything: keep masks whose predicted "
                                          "IoU is above this (default 0.88)")
    stability_score_thresh: float | None = Field(None, ge=0, le=1, description="everything: keep masks at least "
                                                 "this stable under a change of the logit cutoff (default 0.95)")
    nms_thresh: float | None = Field(None, ge=0, le=1, description="everything: no two masks overlap (mask IoU) "
                                     "above this (default 0.7)")
    min_mask_area: int | None = Field(None, ge=0, description="everything: drop masks of fewer pixels (default 0)")
    max_mask_fraction: float | None = Field(None, gt=0, le=1, description="everything: drop masks covering more "
                                            "than this fraction of the image: background, not an object (default 0.95)")
    max_masks: int | None = Field(None, ge=1, description="everything: at most this many masks, largest first")

    @model_validator(mode="after")
    def _one_form(self) -> "SegmentOptions":
        single = self.points is not None or self.box is not None or self.point_labels is not None
        tuned = [name for name in EVERYTHING_OPTIONS if getattr(self, name) is not None]
        if self.mode == "everything":
            if single or self.prompts is not None or self.multimask:
                raise ValueError("`mode: everything` takes no prompt (`points`, `point_labels`, `box`, `multimask`, "
                                 "`prompts`): it finds every object by itself")
            return self
        if tuned:
            raise ValueError(f"{', '.join(f'`{n}`' for n in tuned)} only apply with `mode: everything`")
        if self.prompts is not None and single:
            raise ValueError("give either `prompts` or one prompt's `points`/`point_labels`/`box`, not both")
        if self.prompts is None:
            _check_prompt(self.points, self.point_labels, self.box)
        elif not self.prompts:
            raise ValueError("`prompts` is empty")
        return self

    def prompt_list(self) -> list[dict[str, Any]]:
        if self.prompts is not None:
            return [p.model_dump() for p in self.prompts]
        return [{"points": self.points, "point_labels": self.point_labels, "box": self.box,
                 "multimask": self.multimask}]

    def everything_options(self) -> dict[str, Any]:
        """The ``EverythingOptions`` keyword arguments the request gave (the others keep the library's defaults)."""
        return {name: getattr(self, name) for name in EVERYTHING_OPTIONS if getattr(self, name) is not None}

    def check_limits(self, limits: Limits) -> None:
        if self.mode == "everything":
            if self.points_per_side is None:  # the library's default grid, within this service's limit
                from vfm.models.families.sam_everything import EverythingOptions

                self.points_per_side = min(EverythingOptions().points_per_side, limits.max_points_per_side)
            elif self.points_per_side > limits.max_points_per_side:
                raise invalid_options(f"points_per_side: {self.points_per_side} is above this service's limit of "
                                      f"{limits.max_points_per_side}.")
            return
        prompts = self.prompt_list()
        if len(prompts) > limits.max_prompts:
            raise invalid_options(f"prompts: {len(prompts)} prompts; this service takes at most {limits.max_prompts} "
                                  "per request.")
        for i, p in enumerate(prompts):
            if p["points"] and len(p["points"]) > limits.max_points:
                where = f"prompts[{i}].points" if self.prompts is not None else "points"
                raise invalid_options(f"{where}: {len(p['points'])} points; this service takes at most "
                                      f"{limits.max_points} per prompt.")


class DetectSegmentOptions(Options):
    """Detect, then segment: the ``detector``'s boxes (with its usual options) become this SAM's box prompts."""

    detector: str = Field(..., min_length=1, description="served detector whose boxes are the prompts",
                          examples=["mtcnn_faces"])
    score_threshold: float = Field(0.5, ge=0, le=1, description="drop detections scored below this")
    iou_threshold: float = Field(0.5, ge=0, le=1, description="non-maximum suppression overlap")
    max_detections: int | None = Field(None, ge=1, description="segment at most this many detections, best "
                                       "first (default and most: the service's max_prompts)")
    multimask: bool = Field(False, description="three candidate masks per box instead of one")
    format: Literal["rle", "png", "polygons"] = Field("rle", description="COCO RLE, base64 PNG or polygons")

    def check_limits(self, limits: Limits) -> None:
        # Every detection is one SAM prompt, so the prompt limit bounds them.
        if self.max_detections is not None and self.max_detections > limits.max_prompts:
            raise invalid_options(f"max_detections: {self.max_detections} is above this service's limit of "
                                  f"{limits.max_prompts} prompts per request.")

    def detect_kwargs(self, limits: Limits) -> dict[str, Any]:
        """The detector's ``detect`` options (what its own predict route would take)."""
        return {"score_threshold": self.score_threshold, "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections or limits.max_prompts}


class HeadPredictOptions(ClassifyOptions):
    pass


def coerce_text(value: str) -> Any:
    """A form or query value: JSON when it parses (``5``, ``true``, ``[[1, 2]]``), else the text."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to be an option
        return value


def parse_options(model: type[Options], raw: dict[str, Any], limits: Limits) -> Options:
    """Validate ``raw`` against ``model``; every problem is one 422 that names the option."""
    try:
        options = model.model_validate(raw)
    except ValidationError as exc:
        raise _explain(model, exc) from None
    options.check_limits(limits)
    return options


def _explain(model: type[BaseModel], exc: ValidationError) -> ApiError:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=2)
            known = ", ".join(model.model_fields) or "none"
            hint = f"did you mean {' or '.join(close)}?" if close else f"this route takes: {known}"
            problems.append(f"{key}: unknown option; {hint}")
        else:
            problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    text = "; ".join(problems)
    return invalid_options(text if text.endswith((".", "?")) else text + ".")

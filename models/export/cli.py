"""`vfm export NAME`: write a checked ONNX export of a model into a model repository."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .common import DEFAULT_OPSET, Tolerance
    from .optimize import DEFAULT_FUSION, FUSION_LEVELS

    default = Tolerance()
    p = sub.add_parser("export", help="export a model to ONNX (checked against PyTorch) into a model repository",
                       description="Writes DIR/NAME/1/*.onnx and DIR/NAME/config.json. The export fails, and writes "
                                   "nothing, unless ONNX Runtime matches PyTorch on random inputs of several sizes "
                                   "and aspect ratios.")
    p.add_argument("name", help="model name (see `vfm models list`)")
    p.add_argument("--repository", "--out", dest="out", default=None, metavar="DIR",
                   help="the model repository to write into (default: $VFM_MODEL_REPOSITORY or ./model_repository); "
                        "`vfm predict --backend onnx --repository DIR` reads it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--weights", help="weights source: a path, hf:org/name, https://...#sha256=..., or random")
    p.add_argument("--min-score", type=float, default=None,
                   help="detectors: the lowest score the graph keeps; callers cannot ask for less (default 0.05)")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="detectors: boxes the graph keeps per image before NMS (default 1000)")
    p.add_argument("--atol", type=float, default=None,
                   help=f"parity: absolute tolerance (default: the family's; {default.atol} for most)")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"parity: relative tolerance (default: the family's; {default.rtol} for most)")
    p.add_argument("--min-iou", type=float, default=None,
                   help=f"parity: SAM masks must overlap with at least this IoU (default {default.min_iou})")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="weights in a separate .onnx.data file (default: only past 2 GiB)")
    p.add_argument("--fuse", choices=FUSION_LEVELS, default=DEFAULT_FUSION,
                   help="transformer graph fusion before the parity check: attention (fused multi-head attention "
                        f"kernels), all (+ LayerNorm, GELU, skip-LayerNorm), none (default {DEFAULT_FUSION})")
    p.add_argument("--no-fuse", dest="fuse", action="store_const", const="none", help="same as --fuse none")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs")
    q = p.add_argument_group("int8 and float16 (published as NAME.int8 / NAME.float16 only when they keep the "
                             "float32 answers on real photos)")
    q.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: static QDQ with --calibration, else dynamic; serve it with quantize: int8")
    q.add_argument("--calibration", type=Path, default=None, metavar="FOLDER",
                   help="images to calibrate static int8 on (preprocessed as the model does)")
    q.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="int8 weights per output channel (default: yes)")
    q.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="float16: weights and compute in half, inputs/outputs float32 (for GPUs)")
    q.add_argument("--min-agreement", type=float, default=None, metavar="SHARE",
                   help="int8: the share of float32's answers that must stay: top-1 classes of sure photos "
                        "(classifiers, default 0.99), clear boxes matched (detectors, 0.95), masks kept at "
                        "--match-iou (SAM, 0.95)")
    q.add_argument("--min-margin", type=float, default=0.1, metavar="P",
                   help="a photo is sure when float32's top-1 probability beats its top-2 by P or more; a box is "
                        "clear when its score is P or more above 0.5 (default 0.1)")
    q.add_argument("--match-iou", type=float, default=None, metavar="IOU",
                   help="detectors: a box of the variant matches float32's at this IoU or more (default 0.7); "
                        "SAM: a mask is kept at this IoU or more (default 0.9)")
    q.add_argument("--check-images", type=Path, default=None, metavar="FOLDER",
                   help="photos to check the answers on (default: scikit-image's sample photos)")
    p.add_argument("--json", action="store_true", help="print config.json")
    p.set_defaults(func=cmd_export)


def _tolerance(name: str, args: argparse.Namespace) -> Any:
    """The family's parity limits with the ones given on the command line."""
    import dataclasses

    from .repository import default_tolerance

    given = (("atol", args.atol), ("rtol", args.rtol), ("min_iou", args.min_iou))
    overrides = {k: v for k, v in given if v is not None}
    return dataclasses.replace(default_tolerance(name), **overrides) if overrides else None


def check_summary(check: dict[str, Any]) -> str:
    """One line on what a variant kept (``quantize.check_classifier`` / ``task_checks``' figures)."""
    if "shapes_only" in check:
        return f"checked on declared inputs/outputs only ({check['shapes_only']})"
    if "box_agreement" in check:
        return (f"{check['matched']} of {check['clear_boxes']} clear boxes matched at IoU >= {check['min_iou']} "
                f"({check['box_agreement']}; missed {check['missed']}, extra {check['extra']}) on {check['views']} "
                f"real photo views, box IoU mean {check['box_iou_mean']}, score change mean "
                f"{check['score_mean_abs_diff']} max {check['score_max_abs_diff']}")
    if "mask_agreement" in check:
        return (f"{check['mask_agreement']} of {check['masks_compared']} masks kept IoU >= {check['min_iou']} "
                f"({check['prompts_per_image']} prompts on each of {check['images']} real photos), mask IoU mean "
                f"{check['mask_iou_mean']} min {check['mask_iou_min']}")
    return (f"top-1 agreement {check['top1_agreement']} on the {check['sure_views']} sure ones of {check['views']} "
            f"real photo views, {check['top1_agreement_all_views']} on all")


def cmd_export(args: argparse.Namespace) -> int:
    from vfm.models.errors import UsageError

    from .repository import export_model
    from .common import ExportError, check_opset
    from .quantize import VariantOptions
    from ..registry import UnknownModel, get_spec

    try:
        get_spec(args.name)
        check_opset(args.opset)
        variant = VariantOptions(quantize=args.quantize, dtype=args.dtype, calibration=args.calibration,
                                 per_channel=args.per_channel, min_agreement=args.min_agreement,
                                 min_margin=args.min_margin, check_images=args.check_images,
                                 min_iou=args.match_iou)
    except (UnknownModel, ExportError) as exc:
        raise UsageError(str(exc)) from None
    options = {k: v for k, v in (("min_score", args.min_score), ("max_candidates", args.max_candidates))
               if v is not None}
    # stderr, so --json output stays clean; a full-size model takes minutes (export + parity on CPU)
    print(f"exporting {args.name} and checking it against PyTorch ...", file=sys.stderr, flush=True)
    result = export_model(args.name, args.out, opset=args.opset, weights=args.weights,
                          tolerance=_tolerance(args.name, args), external_data=args.external_data, seed=args.seed,
                          fuse=args.fuse, variant=variant if variant.variant else None, **options)
    if args.json:
        json.dump(result.config, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"exported {result.name} -> {result.folder}")
    for path in result.files:
        print(f"  {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    figures = {k: v for k, v in result.parity.items() if k not in ("tolerance", "sizes")}
    check = result.config.get("check")
    if check:
        print(f"{variant.variant} vs float32: {check_summary(check)}")
    if figures:
        print("parity (ONNX Runtime vs PyTorch): " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in figures.items()))
    print(f"run it: vfm predict {result.name} IMAGE --backend onnx --repository {result.folder.parent}")
    return 0

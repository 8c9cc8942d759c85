"""`vfm models`, `vfm predict`, `vfm weights`: the zoo from the command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TASKS = ("classify", "detect", "embed", "segment")
# The --everything options (EverythingOptions' fields; defaults there).
EVERYTHING_FLAGS = (
    ("--points-per-side", int, "grid points per side (default 32)"),
    ("--points-per-batch", int, "grid points per decoder call (default 64)"),
    ("--pred-iou-thresh", float, "keep masks whose predicted IoU is above this (default 0.88)"),
    ("--stability-score-thresh", float, "keep masks at least this stable (default 0.95)"),
    ("--nms-thresh", float, "no two masks overlap (mask IoU) above this (default 0.7)"),
    ("--min-mask-area", int, "drop masks of fewer pixels (default 0)"),
    ("--max-mask-fraction", float, "drop masks covering more than this fraction of the image (default 0.95)"),
    ("--max-masks", int, "at most this many masks, largest first"),
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list and describe the models of the zoo")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    p = msub.add_parser("list", help="list models, optionally filtered by a wildcard (e.g. 'sam_*')")
    p.add_argument("pattern", nargs="?", help="shell-style wildcard")
    p.add_argument("--task", choices=TASKS, help="only models that can do this task")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("info", help="describe one model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_info)

    p = sub.add_parser("predict", help="run a model on image files (or on a running server with --url)")
    p.add_argument("name", help="model name (see `vfm models list`)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--task", choices=TASKS, help="task to run (default: the model's main task)")
    p.add_argument("--top-k", type=int, help="classify: how many labels (default 5)")
    p.add_argument("--score-threshold", type=float, help="detect: minimum score (default 0.5)")
    p.add_argument("--iou-threshold", type=float, help="detect: NMS IoU (default 0.5)")
    p.add_argument("--max-detections", type=int, help="detect: at most this many boxes (default 100)")
    p.add_argument("--normalize", action="store_true", help="embed: L2-normalise the features")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="segment: a point prompt in pixels (label 1 foreground, 0 background); repeatable")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="segment: a box prompt in pixels")
    p.add_argument("--multimask", action="store_true", help="segment: return 3 candidate masks")
    p.add_argument("--detector", metavar="DETECTOR",
                   help="segment: prompt the SAM with the boxes this detector finds (detect, then segment; "
                        "takes the detect options)")
    p.add_argument("--detector-backend", choices=("torch", "onnx"), default="torch",
                   help="--detector: the detector's backend (default torch)")
    p.add_argument("--everything", action="store_true",
                   help="segment every object, without a prompt (a grid of points; SAM's automatic mask generator)")
    for flag, kind, text in EVERYTHING_FLAGS:
        p.add_argument(flag, type=kind, help=f"--everything: {text}")
    p.add_argument("--out", type=Path, default=Path("."), help="segment: folder for the mask PNGs (default .)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--weights", help="weights source: a path, hf:org/name, https://...#sha256=..., or random")
    p.add_argument("--url", help="call a running vfm server at this URL instead of loading the model here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    weights = sub.add_parser("weights", help="where model weights come from")
    wsub = weights.add_subparsers(dest="weights_command", metavar="SUBCOMMAND", required=True)
    p = wsub.add_parser("where", help="where to put a model's weights for offline use")
    p.add_argument("name")
    p.set_defaults(func=cmd_weights_where)
    p = wsub.add_parser("fetch", help="download a model's weights into the cache now (not with VFM_OFFLINE=1)")
    p.add_argument("name")
    p.set_defaults(func=cmd_weights_fetch)


# ---- models ------------------------------------------------------------------------------

def _spec(name: str):
    from vfm.models.errors import UsageError

    from .registry import UnknownModel, get_spec

    try:
        return get_spec(name)
    except UnknownModel as exc:
        raise UsageError(str(exc)) from None


def cmd_models_list(args: argparse.Namespace) -> int:
    from .registry import get_spec, list_models
    from .weights import describe_source

    names = list_models(args.pattern, task=args.task)
    if args.json:
        print(json.dumps([get_spec(n).to_json() for n in names], indent=2))
        return 0
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = [(n, ",".join(get_spec(n).tasks), "random" if get_spec(n).random_weights
             else describe_source(get_spec(n).weights) or "-") for n in names]
    width = max(len(r[0]) for r in rows)
    twidth = max(len(r[1]) for r in rows)
    for name, tasks, source in rows:
        print(f"{name:<{width}}  {tasks:<{twidth}}  {source}")
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    spec = _spec(args.name)
    info = spec.to_json()
    if spec.labels:
        info["labels_preview"] = list(spec.labels[:10])
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_weights_where(args: argparse.Namespace) -> int:
    from .weights import where_weights

    spec = _spec(args.name)
    print(where_weights(spec.name, spec.weights))
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from .weights import resolve_weights

    spec = _spec(args.name)
    path = resolve_weights(spec.name, spec.weights)  # WeightsUnavailable says what to do instead
    print(path if path is not None else f"{spec.name} has random weights; nothing to download.")
    return 0


# ---- predict -----------------------------------------------------------------------------

def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    from vfm.models.errors import UsageError

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if len(values) not in n or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{what} {text!r} needs {' or '.join(map(str, n))} finite numbers")
    return values


def prompt_from_args(args: argparse.Namespace):
    """--point/--box -> a models.results.Prompt (None when neither is given)."""
    import numpy as np

    from .results import Prompt

    points, labels = [], []
    for text in args.point:
        values = _floats(text, (2, 3), "--point")
        points.append(values[:2])
        labels.append(int(values[2]) if len(values) == 3 else 1)
    box = np.asarray(_floats(args.box, (4,), "--box"), np.float32) if args.box else None
    if not points and box is None:
        return None
    return Prompt(points=np.asarray(points, np.float32) if points else None,
                  point_labels=np.asarray(labels, np.int64) if points else None, box=box, multimask=args.multimask)


def _read_images(paths: list[str]) -> list[Any]:
    from .images import InvalidImage, decode_image

    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            images.append(decode_image(data))
        except InvalidImage as exc:
            raise InvalidImage(exc.code, f"{path}: {exc}") from None
    return images


def task_options(task: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave for ``task`` (None: the server decides the task), checked."""
    from vfm.models.errors import UsageError

    opts: dict[str, Any] = {}
    if args.everything and task != "segment":
        raise UsageError(f"--everything segments; it does not go with --task {task}")
    if task in ("classify", None) and args.top_k is not None:
        if args.top_k < 1:
            raise UsageError("--top-k must be at least 1")
        opts["top_k"] = args.top_k
    if task in ("detect", None):
        for key in ("score_threshold", "iou_threshold"):
            value = getattr(args, key)
            if value is not None:
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise UsageError(f"--{key.replace('_', '-')} must be between 0 and 1")
                opts[key] = value
        if args.max_detections is not None:
            if args.max_detections < 1:
                raise UsageError("--max-detections must be at least 1")
            opts["max_detections"] = args.max_detections
    if task == "embed" and args.normalize:
        opts["normalize"] = True
    if task == "segment" and args.everything:
        return {"mode": "everything", **everything_options(args)}
    if task == "segment":
        prompt = prompt_from_args(args)
        if prompt is None:
            raise UsageError("segment needs a prompt: --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
        if prompt.points is not None:
            opts["points"] = prompt.points.tolist()
            opts["point_labels"] = prompt.point_labels.tolist()
        if prompt.box is not None:
            opts["box"] = prompt.box.tolist()
        opts["multimask"] = bool(prompt.multimask)
    return opts


def everything_options(args: argparse.Namespace) -> dict[str, Any]:
    """The --everything options the user gave, checked as ``EverythingOptions`` checks them."""
    from vfm.models.errors import UsageError

    from .families.sam_everything import EverythingOptions

    if args.point or args.box or args.multimask:
        raise UsageError("--everything takes no prompt: leave out --point, --box and --multimask")
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in EVERYTHING_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        EverythingOptions(**given)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    return given


def run_predict(runner, task: str, images: list, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run one task over decoded images; results as JSON-ready dicts, one per image."""
    from vfm.models.errors import UsageError

    opts = task_options(task, args)
    if task == "classify":
        return [r.to_json() for r in runner.classify(images, top_k=opts.get("top_k", 5))]
    if task == "detect":
        return [r.to_json() for r in runner.detect(images, score_threshold=opts.get("score_threshold", 0.5),
                                                   iou_threshold=opts.get("iou_threshold", 0.5),
                                                   max_detections=opts.get("max_detections", 100))]
    if task == "embed":
        feats = runner.embed(images, normalize=args.normalize)
        return [{"embedding": [round(float(v), 6) for v in row], "dim": int(feats.shape[1])} for row in feats]
    if args.everything:
        options = {k: v for k, v in opts.items() if k != "mode"}
        return [_segment_everything_one(runner, image, options, path, args.out)
                for image, path in zip(images, args.images)]
    prompt = prompt_from_args(args)  # task_options above refused a missing prompt
    return [_segment_one(runner, image, prompt, path, args.out) for image, path in zip(images, args.images)]


def _segment_one(runner, image, prompt, path: str, out_dir: Path) -> dict[str, Any]:
    from PIL import Image

    from .masks import mask_bbox

    embedding = runner.encode([image])[0]
    masks = runner.segment(embedding, [prompt])[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (mask, score) in enumerate(zip(masks.masks, masks.scores)):
        target = out_dir / f"{Path(path).stem}.mask{i}.png"
        Image.fromarray(mask.astype("uint8") * 255, "L").save(target)
        results.append({"png": str(target), "score": round(float(score), 6), "area": int(mask.sum()),
                        "bbox": mask_bbox(mask)})
    return {"masks": results, "image_size": {"height": image.shape[0], "width": image.shape[1]}}


def _segment_everything_one(runner, image, options: dict[str, Any], path: str, out_dir: Path) -> dict[str, Any]:
    from PIL import Image

    embedding = runner.encode([image])[0]
    found = runner.segment_everything(embedding, **options)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, item in enumerate(found.masks):
        target = out_dir / f"{Path(path).stem}.everything{i}.png"
        Image.fromarray(item.mask.astype("uint8") * 255, "L").save(target)
        answer = item.to_json()
        del answer["rle"]
        results.append({"png": str(target), **answer})
    return {"masks": results, "points": found.points,
            "image_size": {"height": image.shape[0], "width": image.shape[1]}}


def _result_task(result: dict[str, Any]) -> str:
    for key, task in (("predictions", "classify"), ("detections", "detect"), ("embedding", "embed")):
        if key in result:
            return task
    return "segment"


def _print_human(task: str, path: str, result: dict[str, Any]) -> None:
    print(path)
    if task == "classify":
        for p in result["predictions"]:
            print(f"  {p['score']:.4f}  {p['label']}")
    elif task == "detect":
        if not result["detections"]:
            print("  no detections")
        for d in result["detections"]:
            print(f"  {d['score']:.4f}  {d['label']:<12} box={d['box']}")
    elif task == "embed":
        v = result["embedding"]
        print(f"  dim={result['dim']} [{', '.join(f'{x:.4f}' for x in v[:6])}{', ...' if len(v) > 6 else ''}]")
    else:
        if not result["masks"]:
            print("  no masks")
        for m in result["masks"]:
            print(f"  score={m['score']:.4f} area={m['area']} bbox={m['bbox']} -> {m.get('png', '(rle)')}")


# ---- predict --detector: detect, then segment -----------------------------------------------

def detect_segment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``--detector``: the detect options, ``multimask``, and no hand-made prompt."""
    from vfm.models.errors import UsageError

    if args.task not in (None, "segment"):
        raise UsageError(f"--detector segments what the detector finds; it does not go with --task {args.task}")
    if args.point or args.box:
        raise UsageError("--detector makes the prompts from its boxes; drop --point/--box")
    return {**task_options("detect", args), "detector": args.detector, "multimask": bool(args.multimask)}


def run_detect_segment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``vfm predict SAM IMAGE... --detector DETECTOR``: boxes, labels and masks (PNG files in ``--out``)."""
    from vfm.models.errors import UsageError

    from .loading import load_model
    from .pipelines import detect_then_segment, merge_json

    options = detect_segment_options(args)
    if args.url:
        remote = getattr(args, "remote_predict", None)
        if remote is None:
            raise UsageError("--url needs the service package (pip install vfm)")
        answers = remote(args.url, args.name, args.images, {**options, "format": "png"}, "detect-segment")
        return [_save_remote_masks(answer, path, args.out) for answer, path in zip(answers, args.images)]
    spec, detector_spec = _spec(args.name), _spec(args.detector)
    if "segment" not in spec.tasks:
        raise UsageError(f"--detector prompts a SAM; {spec.name!r} does {', '.join(spec.tasks)}")
    if "detect" not in detector_spec.tasks:
        raise UsageError(f"--detector {detector_spec.name!r} is not a detector; it does "
                         f"{', '.join(detector_spec.tasks)}")
    images = _read_images(args.images)
    sam = load_model(spec.name, backend=args.backend, device=args.device, weights=args.weights)
    detector = load_model(detector_spec.name, backend=args.detector_backend, device=args.device)
    detect = {k: v for k, v in options.items() if k in ("score_threshold", "iou_threshold", "max_detections")}
    results = detect_then_segment(detector, sam, images, multimask=options["multimask"], **detect)
    out = []
    for result, path in zip(results, args.images):
        saved = [[_save_mask(mask, score, _mask_path(args.out, path, i, j)) for j, (mask, score)
                  in enumerate(zip(masks.masks, masks.scores))] for i, masks in enumerate(result.masks)]
        out.append({"image_size": {"height": result.image_size[0], "width": result.image_size[1]},
                    "detections": merge_json([d.to_json() for d in result.detections], saved)})
    return out


def _mask_path(out_dir: Path, image_path: str, detection: int, mask: int) -> Path:
    return out_dir / f"{Path(image_path).stem}.det{detection}.mask{mask}.png"


def _save_mask(mask: Any, score: float, target: Path) -> dict[str, Any]:
    from PIL import Image

    from .masks import mask_bbox

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype("uint8") * 255, "L").save(target)
    return {"png": str(target), "score": round(float(score), 6), "area": int(mask.sum()), "bbox": mask_bbox(mask)}


def _save_remote_masks(answer: dict[str, Any], image_path: str, out_dir: Path) -> dict[str, Any]:
    """A server's answer with each base64 PNG mask written to ``out_dir`` and replaced by the file's path."""
    import base64

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, detection in enumerate(answer.get("detections", [])):
        for j, mask in enumerate(detection.get("masks", [])):
            target = _mask_path(out_dir, image_path, i, j)
            target.write_bytes(base64.b64decode(mask["png"]))
            mask["png"] = str(target)
    return answer


def _print_detect_segment(path: str, result: dict[str, Any]) -> None:
    print(path)
    if not result["detections"]:
        print("  no detections")
    for d in result["detections"]:
        print(f"  {d['score']:.4f}  {d['label']:<12} box={d['box']}")
        for m in d["masks"]:
            print(f"    mask score={m['score']:.4f} area={m['area']} bbox={m['bbox']} -> {m['png']}")


def cmd_predict(args: argparse.Namespace) -> int:
    from vfm.models.errors import UsageError

    from .loading import load_model

    if args.detector and args.everything:
        raise UsageError("--detector prompts the SAM with the detector's boxes and --everything with a grid of "
                         "points: use one of them")
    if args.detector:
        results = run_detect_segment(args)
        if args.json:
            print(json.dumps([{"image": p, **r} for p, r in zip(args.images, results)], indent=2))
        else:
            for path, result in zip(args.images, results):
                _print_detect_segment(path, result)
        return 0
    if args.url:
        # The HTTP client lives with the service; the dispatcher wires it in (models never imports service).
        # The server knows its served names (which may alias registry models), so no local lookup here.
        remote = getattr(args, "remote_predict", None)
        if remote is None:
            raise UsageError("--url needs the service package (pip install vfm)")
        task = args.task or ("segment" if args.everything else None)
        results = remote(args.url, args.name, args.images, task_options(task, args), task)
    else:
        spec = _spec(args.name)
        task = args.task or ("segment" if args.everything else spec.task)
        if task not in spec.tasks:
            raise UsageError(f"model {spec.name!r} does not {task}; it supports: {', '.join(spec.tasks)}")
        images = _read_images(args.images)
        runner = load_model(spec.name, backend=args.backend, device=args.device, weights=args.weights)
        results = run_predict(runner, task, images, args)
    if args.json:
        print(json.dumps([{"image": p, **r} for p, r in zip(args.images, results)], indent=2))
    else:
        for path, result in zip(args.images, results):
            _print_human(_result_task(result), path, result)
    return 0

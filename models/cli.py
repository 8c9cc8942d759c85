"""`vfm models`, `vfm predict`, `vfm weights`: the zoo from the command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TASKS = ("classify", "detect", "embed", "segment")


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
        for m in result["masks"]:
            print(f"  score={m['score']:.4f} area={m['area']} bbox={m['bbox']} -> {m.get('png', '(rle)')}")


def cmd_predict(args: argparse.Namespace) -> int:
    from vfm.models.errors import UsageError

    from .loading import load_model

    if args.url:
        # The HTTP client lives with the service; the dispatcher wires it in (models never imports service).
        # The server knows its served names (which may alias registry models), so no local lookup here.
        remote = getattr(args, "remote_predict", None)
        if remote is None:
            raise UsageError("--url needs the service package (pip install vfm)")
        results = remote(args.url, args.name, args.images, task_options(args.task, args), args.task)
    else:
        spec = _spec(args.name)
        task = args.task or spec.task
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

"""`vfm predict` in this process: batches of images through a runner, one ``Outcome`` per input, in order.

Images are read a batch at a time (``--batch-size``), so a folder of thousands never sits in
memory at once; an input that cannot be read becomes a failed ``Outcome`` and the others run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .inputs import ImageFailure, Outcome, batched, read_image
from .options import DETECT_KEYS, prompt_from_args

BatchFn = Callable[[list[Any], list[str]], list[tuple[dict[str, Any], Any]]]


def run_batches(paths: Sequence[str], batch_size: int, run: BatchFn) -> Iterator[Outcome]:
    """Read each batch, run ``run(images, paths)`` -> [(result, vector)] on the readable ones, yield in order."""
    for chunk in batched(paths, batch_size):
        outcomes = []
        for path in chunk:
            try:
                outcomes.append(Outcome(path, image=read_image(path)))
            except ImageFailure as exc:
                outcomes.append(Outcome(path, error=str(exc)))
        good = [o for o in outcomes if o.error is None]
        if good:
            for outcome, (result, vector) in zip(good, run([o.image for o in good], [o.path for o in good])):
                outcome.result, outcome.vector = result, vector
        yield from outcomes


def task_batch(runner: Any, task: str, opts: dict[str, Any], args: argparse.Namespace) -> BatchFn:
    """The function that runs ``task`` with ``opts`` on a batch of decoded images."""
    if task == "classify":
        return lambda images, paths: [(r.to_json(), None) for r in runner.classify(images,
                                                                                   top_k=opts.get("top_k", 5))]
    if task == "detect":
        return lambda images, paths: [(r.to_json(), None) for r in runner.detect(
            images, score_threshold=opts.get("score_threshold", 0.5), iou_threshold=opts.get("iou_threshold", 0.5),
            max_detections=opts.get("max_detections", 100))]
    if task == "embed":
        def embed(images: list[Any], paths: list[str]) -> list[tuple[dict[str, Any], Any]]:
            feats = runner.embed(images, normalize=args.normalize)
            return [({"embedding": [round(float(v), 6) for v in row], "dim": int(feats.shape[1])}, row)
                    for row in feats]
        return embed
    if args.everything:
        options = {k: v for k, v in opts.items() if k != "mode"}
        return lambda images, paths: [(_segment_everything_one(runner, image, options, path, args.out), None)
                                      for image, path in zip(images, paths)]
    prompt = prompt_from_args(args)  # task_options refused a missing prompt
    return lambda images, paths: [(_segment_one(runner, image, prompt, path, args.out), None)
                                  for image, path in zip(images, paths)]


def _segment_one(runner: Any, image: Any, prompt: Any, path: str, out_dir: Path) -> dict[str, Any]:
    embedding = runner.encode([image])[0]
    masks = runner.segment(embedding, [prompt])[0]
    saved = [save_mask(mask, score, out_dir / f"{Path(path).stem}.mask{i}.png")
             for i, (mask, score) in enumerate(zip(masks.masks, masks.scores))]
    return {"masks": saved, "image_size": {"height": image.shape[0], "width": image.shape[1]}}


def _segment_everything_one(runner: Any, image: Any, options: dict[str, Any], path: str, out_dir: Path
                            ) -> dict[str, Any]:
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


def save_mask(mask: Any, score: float, target: Path) -> dict[str, Any]:
    from PIL import Image

    from ..masks import mask_bbox

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype("uint8") * 255, "L").save(target)
    return {"png": str(target), "score": round(float(score), 6), "area": int(mask.sum()), "bbox": mask_bbox(mask)}


def mask_path(out_dir: Path, image_path: str, detection: int, mask: int) -> Path:
    return out_dir / f"{Path(image_path).stem}.det{detection}.mask{mask}.png"


def detect_segment_batch(detector: Any, sam: Any, options: dict[str, Any], out_dir: Path) -> BatchFn:
    """``--detector``: the detector's boxes prompt the SAM; masks written as PNGs into ``out_dir``."""
    from ..pipelines import detect_then_segment, merge_json

    detect = {k: v for k, v in options.items() if k in DETECT_KEYS}

    def run(images: list[Any], paths: list[str]) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for result, path in zip(detect_then_segment(detector, sam, images, multimask=options["multimask"], **detect),
                                paths):
            saved = [[save_mask(mask, score, mask_path(out_dir, path, i, j)) for j, (mask, score)
                      in enumerate(zip(masks.masks, masks.scores))] for i, masks in enumerate(result.masks)]
            out.append(({"image_size": {"height": result.image_size[0], "width": result.image_size[1]},
                         "detections": merge_json([d.to_json() for d in result.detections], saved)}, None))
        return out
    return run


def save_remote_masks(answer: dict[str, Any], image_path: str, out_dir: Path) -> dict[str, Any]:
    """A server's detect-segment answer with each base64 PNG mask written to ``out_dir`` and replaced by its path."""
    import base64

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, detection in enumerate(answer.get("detections", [])):
        for j, mask in enumerate(detection.get("masks", [])):
            target = mask_path(out_dir, image_path, i, j)
            target.write_bytes(base64.b64decode(mask["png"]))
            mask["png"] = str(target)
    return answer

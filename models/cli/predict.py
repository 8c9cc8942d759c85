"""`vfm predict MODEL PATH...`: a model over files, folders and globs, here or on a server (``--url``).

Answers go out in input order, each as soon as it is ready (``--jsonl`` streams them); an input
that cannot be read or decoded is one ``vfm: error: PATH: ...`` line on stderr, the others still
run, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UsageError
from .inputs import Outcome, expand_inputs
from .options import EVERYTHING_FLAGS, TASKS, detect_segment_options, task_options
from .outputs import CsvSink, DrawSink, JsonlSink, JsonSink, NpySink, Sink, TextSink
from .zoo import spec_or_usage_error

DEFAULT_CONCURRENCY = 4
HEADS_DIR_ENV = "VFM_HEADS_DIR"


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """PATH... and how they are read and answered: shared by `vfm predict` and `vfm heads predict`."""
    p.add_argument("images", nargs="+", metavar="PATH",
                   help="image files, folders (the images in them, sorted by name) or globs ('photos/*.jpg', "
                        "'data/**/*.png'; quoted, vfm expands them)")
    p.add_argument("-r", "--recursive", action="store_true", help="folders: also the images in their subfolders")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per forward pass (default 8; 1 for segment)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON list at the end")
    out.add_argument("--jsonl", action="store_true",
                     help="print one JSON object per image (with its \"image\" path) as soon as it is answered")
    p.add_argument("--csv", metavar="FILE", help="write the answers as a CSV table ('-': stdout); columns by task")
    p.add_argument("--draw", metavar="OUT_DIR",
                   help="write each image with its answer drawn on it (boxes, landmarks, masks, top-k) to OUT_DIR")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: when stderr is a terminal and there are several images)")
    p.add_argument("--url", help="call a running vfm server at this URL instead of loading the model here")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"--url: requests in flight at once (default {DEFAULT_CONCURRENCY}); answers keep input order")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a model on images: files, folders, globs (or on a server with --url)")
    p.add_argument("name", help="model name (see `vfm models list`)")
    add_input_arguments(p)
    p.add_argument("--npy", metavar="FILE",
                   help="--task embed: save the embeddings as one N x D float32 array (rows in input order); "
                        "FILE's stem + .paths.txt names the image of each row")
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
    p.add_argument("--repository", metavar="DIR",
                   help="--backend onnx: the model repository holding the exports (default: $VFM_MODEL_REPOSITORY "
                        "or ./model_repository)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="--backend onnx: run the model's int8 export (`vfm export NAME --quantize int8`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--weights", help="weights source: a path, hf:org/name, https://...#sha256=..., or random")
    p.set_defaults(func=cmd_predict)


# ---- the loop every run shares -----------------------------------------------------------------

class Reporter:
    """stdout and stderr lines, through the progress bar when there is one; each warning once."""

    def __init__(self, total: int, progress: bool | None):
        show = progress if progress is not None else (total > 1 and sys.stderr.isatty())
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.warned: set[str] = set()

    def out(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def err(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        if text not in self.warned:
            self.warned.add(text)
            self.err(f"vfm: warning: {text}")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_sinks(args: argparse.Namespace, reporter: Reporter) -> list[Sink]:
    """The outputs asked for; ``--draw`` first, so the others see the ``drawn`` path it adds."""
    sinks: list[Sink] = []
    if args.draw:
        sinks.append(DrawSink(args.draw))
    if getattr(args, "npy", None):
        sinks.append(NpySink(args.npy))
    if args.csv:
        sinks.append(CsvSink(args.csv))
    if args.json:
        sinks.append(JsonSink(reporter.out))
    elif args.jsonl:
        sinks.append(JsonlSink(reporter.out))
    elif not (getattr(args, "npy", None) or args.csv):  # a table or an array file says it all
        sinks.append(TextSink(reporter.out))
    return sinks


def write_outcomes(outcomes: Iterable[Outcome], total: int, args: argparse.Namespace,
                   warnings: list[str] = ()) -> int:
    """Send every outcome to the outputs; 0 when every input was answered, else 1."""
    reporter = Reporter(total, args.progress)
    sinks = build_sinks(args, reporter)
    failed = 0
    try:
        for text in warnings:
            reporter.warn(text)
        for outcome in outcomes:
            if outcome.ok:
                if warnings:
                    outcome.result["warnings"] = list(warnings)
                for text in outcome.result.get("warnings") or ():
                    reporter.warn(text)
            if outcome.ok and args.draw:
                try:
                    sinks[0].write(outcome)
                except Exception as exc:  # a picture that cannot be drawn or written fails that input only
                    outcome.result, outcome.error = None, f"{outcome.path}: --draw: {' '.join(str(exc).split())}"
            if not outcome.ok:
                failed += 1
                reporter.err(f"vfm: error: {outcome.error}")
            for sink in sinks[1 if args.draw else 0:]:
                sink.write(outcome)
            reporter.step()
        for sink in sinks:
            sink.close()
        for sink in sinks:
            if sink.summary():
                reporter.err(f"vfm: {sink.summary()}")
    finally:
        reporter.close()
    if failed and total > 1:
        print(f"vfm: {failed} of {total} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def check_outputs(args: argparse.Namespace, task: str | None) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if getattr(args, "npy", None) and task != "embed":
        raise UsageError("--npy saves embeddings: add --task embed")
    if args.draw and task == "embed":
        raise UsageError("--draw pictures classify, detect and segment answers; an embedding has no picture")


def random_weights_warning(spec: Any, weights: str | None) -> list[str]:
    """The warning every answer of a trained model run with ``--weights random`` carries."""
    if isinstance(weights, str) and weights.strip().lower() == "random" and not spec.random_weights:
        return [f"{spec.name} runs with random weights: its answers are meaningless"]
    return []


def heads_dir() -> Path:
    return Path(os.environ.get(HEADS_DIR_ENV) or "heads")


def model_spec(name: str, head_command: str) -> Any:
    """The spec of ``name``; a name that is a fine-tuned head in the heads folder says so."""
    try:
        return spec_or_usage_error(name)
    except UsageError:
        if (heads_dir() / name / "head.json").is_file():
            raise UsageError(f"{name!r} is a head (in {heads_dir()}), not a model: use `{head_command}`") from None
        raise


# ---- local ------------------------------------------------------------------------------------

def load_runner(name: str, backend: str, args: argparse.Namespace, weights: str | None) -> Any:
    """``load_model``, with an ONNX export that is missing or stale reported as the CLI flags that fix it."""
    from ..export import ExportNotFound, ExportStale, repository_root
    from ..loading import load_model

    options: dict[str, Any] = {"repository": args.repository} if backend == "onnx" and args.repository else {}
    quantize = getattr(args, "quantize", None) if name == args.name else None  # not the --detector's
    if quantize:
        options["quantize"] = quantize
    try:
        return load_model(name, backend=backend, device=args.device, weights=weights, **options)
    except (ExportNotFound, ExportStale) as exc:
        root = repository_root(args.repository)
        export = (f"`vfm export {name}" + (f" --quantize {quantize}" if quantize else "") + f" --repository {root}"
                  + (f" --weights {weights}`" if weights else "`"))
        if isinstance(exc, ExportNotFound):
            raise UsageError(f"model {name!r} has no ONNX export in {root}: run {export} first, or point "
                             "--repository (or $VFM_MODEL_REPOSITORY) at the folder that holds it") from None
        reason = str(exc).split("; run ")[0].split(". Run ")[0]
        raise UsageError(f"{reason}: run {export} again") from None


Local = tuple[Iterator[Outcome], list[str], list[str]]  # outcomes, the inputs' paths, warnings


def _local_outcomes(args: argparse.Namespace) -> Local:
    from .local import run_batches, task_batch

    spec = model_spec(args.name, f"vfm heads predict {args.name} PATH...")
    task = args.task or ("segment" if args.everything else spec.task)
    if task not in spec.tasks:
        raise UsageError(f"model {spec.name!r} does not {task}; it supports: {', '.join(spec.tasks)}")
    check_outputs(args, task)
    opts = task_options(task, args)
    paths = expand_inputs(args.images, args.recursive)  # after the usage errors, before the model loads
    runner = load_runner(spec.name, args.backend, args, args.weights)
    batch = args.batch_size or (1 if task == "segment" else 8)
    return (run_batches(paths, batch, task_batch(runner, task, opts, args)), paths,
            random_weights_warning(spec, args.weights))


def _detect_segment_outcomes(args: argparse.Namespace) -> Local:
    from .local import detect_segment_batch, run_batches

    options = detect_segment_options(args)
    check_outputs(args, "segment")
    spec, detector_spec = spec_or_usage_error(args.name), spec_or_usage_error(args.detector)
    if "segment" not in spec.tasks:
        raise UsageError(f"--detector prompts a SAM; {spec.name!r} does {', '.join(spec.tasks)}")
    if "detect" not in detector_spec.tasks:
        raise UsageError(f"--detector {detector_spec.name!r} is not a detector; it does "
                         f"{', '.join(detector_spec.tasks)}")
    paths = expand_inputs(args.images, args.recursive)
    sam = load_runner(spec.name, args.backend, args, args.weights)
    detector = load_runner(detector_spec.name, args.detector_backend, args, None)
    run = detect_segment_batch(detector, sam, options, args.out)
    return run_batches(paths, args.batch_size or 1, run), paths, random_weights_warning(spec, args.weights)


# ---- remote -----------------------------------------------------------------------------------

def remote_calls(args: argparse.Namespace) -> Any:
    """The HTTP client the dispatcher wires in (the client lives with the service; models never imports it)."""
    remote = getattr(args, "remote", None)
    if remote is None:
        raise UsageError("--url needs the service package (pip install vfm)")
    for flag in ("weights", "repository"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag} is the server's to choose (its config); drop it with --url")
    return remote


def _remote_outcomes(args: argparse.Namespace, paths: list[str], options: dict[str, Any], task: str | None
                     ) -> Iterator[Outcome]:
    """The server's answers, in input order. The server knows its served names (which may alias registry
    models), so nothing is looked up here."""
    remote = remote_calls(args)
    if args.detector:
        from .local import save_remote_masks

        answers = remote.predict(args.name, paths, {**options, "format": "png"}, "detect-segment", args.concurrency)
        for path, answer, error in answers:
            yield Outcome(path, result=save_remote_masks(answer, path, args.out) if answer is not None else None,
                          error=error)
        return
    for path, answer, error in remote.predict(args.name, paths, options, task, args.concurrency):
        yield Outcome(path, result=answer, error=error)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.detector and args.everything:
        raise UsageError("--detector prompts the SAM with the detector's boxes and --everything with a grid of "
                         "points: use one of them")
    if args.quantize and (args.url or args.backend != "onnx"):
        raise UsageError("--quantize int8 runs an int8 ONNX export: it goes with --backend onnx (on a server, "
                         "the config's quantize: int8 chooses it)")
    if args.repository and not args.url and "onnx" not in (args.backend, args.detector_backend):
        raise UsageError("--repository holds ONNX exports: it goes with --backend onnx (or --detector-backend onnx)")
    if args.url:
        remote_calls(args)
        task = "segment" if args.detector else args.task or ("segment" if args.everything else None)
        check_outputs(args, task)
        options = detect_segment_options(args) if args.detector else task_options(task, args)
        paths = expand_inputs(args.images, args.recursive)
        return write_outcomes(_remote_outcomes(args, paths, options, task), len(paths), args)
    outcomes, paths, warnings = _detect_segment_outcomes(args) if args.detector else _local_outcomes(args)
    return write_outcomes(outcomes, len(paths), args, warnings)

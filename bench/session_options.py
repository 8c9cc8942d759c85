"""Benchmark (not a test): ONNX Runtime session options on exported graphs, side by side in one run.

    .venv/bin/python bench/session_options.py --repository DIR [--models vit_b_16,dinov2_small]
                                              [--threads 2] [--rounds 7] [--batches 1,8]

For every export in DIR (``vfm export NAME --weights random --repository DIR``; with
``--compare DIR2`` also the same model from a second repository, e.g. one exported with
``--no-fuse``), opens one session per variant of the options a replica can be given (graph
optimisation level, execution mode, memory arena) and times ``session.run`` on a random batch
of the graph's input size at each batch size (``--clock cpu``: CPU time, for a busy machine). Rounds alternate the variants so a change in
machine load hits all alike; each figure is the median over rounds, printed relative to the
first variant (the recorded defaults, ``export.optimize.SESSION_DEFAULTS``), with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS: dict[str, dict[str, Any]] = {
    "recorded defaults": {},
    "level extended": {"graph_optimization_level": "extended"},
    "level basic": {"graph_optimization_level": "basic"},
    "parallel": {"execution_mode": "parallel"},
    "no arena": {"enable_cpu_mem_arena": False, "enable_mem_pattern": False},
}


def feeds(session: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d <= 0 else d for d in spec.shape]
        out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="model repository holding the exports")
    parser.add_argument("--compare", default=None, help="a second repository to time the same models from")
    parser.add_argument("--models", default=None, help="comma-separated names (default: every export in DIR)")
    parser.add_argument("--graph", default=None, help="graph key (default: model or encoder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (time.process_time), steadier than wall time on a "
                             "machine shared with other work; meaningful with --threads 1 (no pool threads spinning)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of: " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)

    from vfm.models.backends.onnx import SessionSettings, session_options
    from vfm.models.export.optimize import SESSION_DEFAULTS
    from vfm.models.export.repository import folder_name

    import onnxruntime as ort

    settings = SessionSettings(device="cpu", num_threads=args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    roots = [Path(args.repository)] + ([Path(args.compare)] if args.compare else [])
    names = ([m.strip() for m in args.models.split(",") if m.strip()] if args.models
             else sorted(json.loads(p.read_text())["name"] for p in roots[0].glob("*/config.json")))
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"threads {args.threads}, rounds {args.rounds}, {args.clock} clock, load average {os.getloadavg()}")
    print(f"{'model':<28} {'repository':<22} {'variant':<18} {'batch':>5} {'ms':>9} {'/ first':>8}")
    for name in names:
        sessions: dict[tuple[str, str], Any] = {}
        for root in roots:
            config = json.loads((root / folder_name(name) / "config.json").read_text())
            key = args.graph or ("model" if "model" in config["graphs"] else next(iter(config["graphs"])))
            path = root / folder_name(name) / str(config["version"]) / config["graphs"][key]["file"]
            for variant in chosen:
                options = session_options(settings, {**SESSION_DEFAULTS, **VARIANTS[variant]})
                sessions[(root.name, variant)] = ort.InferenceSession(str(path), options,
                                                                      providers=["CPUExecutionProvider"])
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = {k: feeds(s, batch, 0) for k, s in sessions.items()}
            samples: dict[tuple[str, str], list[float]] = {k: [] for k in sessions}
            for k, s in sessions.items():  # warm-up
                s.run(None, inputs[k])
            order = list(sessions)
            for i in range(args.rounds):
                for k in (order if i % 2 == 0 else order[::-1]):
                    start = clock()
                    sessions[k].run(None, inputs[k])
                    samples[k].append(clock() - start)
            first = statistics.median(samples[order[0]])
            for k in order:
                t = statistics.median(samples[k])
                print(f"{name:<28} {k[0]:<22} {k[1]:<18} {batch:>5} {t * 1e3:>9.1f} {t / first:>8.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Profile (not a test): where an exported graph's time goes in ONNX Runtime, per op type, next to
where the PyTorch module's time goes, per aten op, on the same input.

    .venv/bin/python bench/profile_ops.py MODEL_FOLDER_OR_ONNX --model swin_t [--batch 8] [--threads 2]
                                          [--runs 5] [--weights random] [--graph model] [--top 15]

ONNX Runtime: ``SessionOptions.enable_profiling`` over ``--runs`` runs after one warm-up, node events
summed per op type (and the costliest single nodes). PyTorch: ``torch.profiler`` over the same runs,
self CPU time per aten op. Shares (%) are what to compare on a shared machine; absolute times are
only as steady as the machine's load (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def onnx_path(where: Path, graph: str) -> Path:
    if where.suffix == ".onnx":
        return where
    found = sorted(where.rglob(f"{graph}.onnx"))
    if not found:
        raise SystemExit(f"profile_ops: no {graph}.onnx under {where}")
    return found[-1]


def ort_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> tuple[dict, list, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="vfm-prof-")) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    import time

    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    wall = (time.perf_counter() - start) / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    # the first model_run is the warm-up: skip the node events before the second one starts
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cut = starts[1] - 1 if len(starts) > 1 else 0
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cut:
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"] / runs / 1e3
            per_node[(op, e["name"][:-len("_kernel_time")])] += e["dur"] / runs / 1e3
    return per_op, sorted(per_node.items(), key=lambda kv: -kv[1]), wall * 1e3


def torch_profile(module, inputs, runs: int) -> tuple[dict, float]:
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        module(*inputs)
        start = time.perf_counter()
        for _ in range(runs):
            module(*inputs)
        wall = (time.perf_counter() - start) / runs
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                module(*inputs)
    per_op = {e.key: e.self_cpu_time_total / runs / 1e3 for e in prof.key_averages()}
    return per_op, wall * 1e3


def table(title: str, per_op: dict, wall: float, top: int) -> None:
    total = sum(per_op.values()) or 1.0
    print(f"\n{title}: {wall:.1f} ms a run (wall), op time {total:.1f} ms")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {op:<40} {ms:>9.2f} ms {100 * ms / total:>6.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an export's folder (or one .onnx file)")
    parser.add_argument("--model", required=True, help="the registry name (for the PyTorch module)")
    parser.add_argument("--graph", default="model", help="which graph of a several-graph export")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="spatial size of the input (default: the graph's fixed one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--nodes", default=None, help="list the costliest nodes of these op types only (A,B)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)

    import onnx
    import torch

    torch.set_num_threads(args.threads)
    path = onnx_path(args.export, args.graph)
    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else None for d in graph_input.type.tensor_type.shape.dim]
    dims[0] = args.batch
    if args.size:
        dims[2:4] = args.size
    if any(d is None for d in dims):
        raise SystemExit(f"profile_ops: give --size H W for the input of shape {dims}")
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    print(f"{path} input {graph_input.name} {dims}, {args.threads} threads, {args.runs} runs, "
          f"load average {os.getloadavg()}")
    per_op, nodes, wall = ort_profile(path, {graph_input.name: x}, args.threads, args.runs)
    table("ONNX Runtime", per_op, wall, args.top)
    print("  costliest nodes:")
    wanted = set(args.nodes.split(",")) if args.nodes else None
    for (op, name), ms in [n for n in nodes if wanted is None or n[0][0] in wanted][:args.top]:
        print(f"    {op:<22} {name[:60]:<60} {ms:>8.2f} ms")
    if not args.no_torch:
        from vfm.models import load_model

        runner = load_model(args.model, device="cpu", weights=args.weights)
        module = runner.torch_module(args.graph) if args.graph != "model" else runner.torch_module()
        module = module.float().eval()
        per_op, wall = torch_profile(module, (torch.from_numpy(x),), args.runs)
        table("PyTorch", per_op, wall, args.top)
    print(f"\nload average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

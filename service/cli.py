"""`vfm serve`: run the service in the foreground until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the models of a config over HTTP (Ray Serve)",
                              description="Start (or join) Ray, deploy every model of the config as its own Serve "
                                          "deployment and answer HTTP until interrupted.")
    p.add_argument("--config", type=Path, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--host", help="bind address (overrides the config's host)")
    p.add_argument("--port", type=int, help="HTTP port (overrides the config's port)")
    p.add_argument("--address", help="join this Ray cluster (auto, ray://head:10001) instead of starting one")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per HTTP request (off by default; the config's `access_log: true` does the same)")
    p.add_argument("--check", action="store_true",
                   help="validate the config and report which models can serve, then exit (starts nothing)")
    p.add_argument("--render", choices=("serve", "kuberay", "compose"),
                   help="print the Ray Serve config, the KubeRay RayService or the docker compose file of the "
                        "config, then exit (starts nothing; see the README's 'Run on a cluster')")
    p.set_defaults(func=cmd_serve)


def _load(args: argparse.Namespace):
    from vfm.models.errors import UsageError

    from .config import ConfigError, load_config

    try:
        return load_config(args.config, host=args.host, port=args.port, address=args.address,
                           access_log=True if getattr(args, "access_log", False) else None)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _render(args: argparse.Namespace, cfg) -> int:
    from vfm.models.errors import UsageError

    from .config import DEFAULT_CONFIG
    from .render import render

    if args.check or args.address:
        raise UsageError(f"--render prints a file and starts nothing; drop {'--check' if args.check else '--address'}")
    if args.host and args.render != "compose":
        raise UsageError(f"--host has no effect on --render {args.render}: a cluster's proxies listen on every "
                         "interface, and what is exposed is decided outside (a Kubernetes Service, published ports)")
    source = args.config or DEFAULT_CONFIG
    if source.is_absolute() and source.resolve().is_relative_to(Path.cwd().resolve()):
        source = source.resolve().relative_to(Path.cwd().resolve())
    sys.stdout.write(render(args.render, cfg, source.as_posix()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.render:
        return _render(args, cfg)
    if args.check:
        return _check(cfg)
    logging.getLogger("service").setLevel(logging.INFO)
    from .app import connect, deploy

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    plan, started_ray = connect(cfg)
    # Installed after Ray starts, which sets its own SIGTERM handler (exit, or abort in its C++ core);
    # a signal during the deployment below is kept and acted on once it returns.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    running = deploy(plan, started_ray)
    try:
        unavailable = running.plan.unavailable
        print(f"vfm: serving {len(running.plan.deployable)} model(s) at {running.url} (docs: {running.url}/docs)",
              file=sys.stderr, flush=True)
        for name, reason in unavailable.items():
            print(f"vfm: {name} is unavailable: {reason}", file=sys.stderr, flush=True)
        while not stop.wait(0.1):
            pass
        print("vfm: shutting down", file=sys.stderr, flush=True)
    finally:
        started = time.monotonic()
        running.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"vfm: stopped in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return 0


def _check(cfg) -> int:
    from .app import absolutize, plan_service

    logging.getLogger("service").setLevel(logging.ERROR)  # the report below says it once
    plan = plan_service(absolutize(cfg))
    for name, entry in plan.entries.items():
        line = f"{name}: {entry.status}"
        print(line + (f" ({entry.reason})" if entry.reason else ""))
    return 0 if not plan.unavailable else 1

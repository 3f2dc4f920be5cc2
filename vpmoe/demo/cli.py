"""`vpmoe demo [--out DIR] [--quick]`: the whole pipeline, tiny, on the CPU (see pipeline.py)."""
from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from vpmoe.demo.pipeline import Demo, DemoSettings

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    Demo(args.out, settings, progress=not args.no_progress).run()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline tiny on the CPU: data, teacher, cache, "
                                           "CE vs KD students, eval, report")
    p.add_argument("--out", default="runs/demo", help="output directory (finished steps are reused)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (seconds), for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_demo)

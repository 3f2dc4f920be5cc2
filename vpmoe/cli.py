"""The `vpmoe` command line: one entry point, one subcommand per stage.

Each component registers its own subcommands through a `register(subparsers)` function in its
`cli` module (vpmoe.data.cli, vpmoe.train.cli, ...), so this file stays a thin dispatcher. Errors
that are the user's (bad config, bad input file) print one clear line and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# component modules that add subcommands; a module missing from this install is skipped
COMPONENTS = [
    "vpmoe.data.cli",
    "vpmoe.train.cli",
    "vpmoe.kd.cli",
    "vpmoe.eval.cli",
    "vpmoe.demo.cli",
]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def cmd_params(args: argparse.Namespace) -> None:
    from vpmoe.config import load_model_config
    from vpmoe.model.params import count_params

    cfg = load_model_config(args.config)
    counts = count_params(cfg)
    if args.json:
        print(json.dumps(counts))
        return
    for key, value in counts.items():
        print(f"{key:>22}: {value:>15,d}  ({value / 1e9:.3f}B)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpmoe", description="vpMoE training system")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts of a model config (no weights allocated)")
    p.add_argument("config", help="TOML file with a [model] table, e.g. configs/vpmoe.toml")
    p.add_argument("--json", action="store_true", help="print {total, active, active_non_embedding}")
    p.set_defaults(func=cmd_params)
    for name in COMPONENTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # component not built yet / not installed
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vpmoe.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    # path mistakes (an output that is a file where a folder goes, or the reverse) are the user's too:
    # Python's message names the path
    except (ConfigError, UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        print(f"vpmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # `python -m vpmoe.cli`: run the importable module, so its classes are the ones caught
    from vpmoe.cli import main as _main

    sys.exit(_main())

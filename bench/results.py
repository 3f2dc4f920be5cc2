"""Append a benchmark's figures to bench/RESULTS.md with device, date and git sha.

Every benchmark prints its table and calls `append_results(name, command, rows)` (most through
`report`, which does that under `--record` and only prints otherwise); the file is append-only
history, newest at the bottom, so figures from different runs are never mixed up.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

from vpmoe.utils import git_sha

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name (Linux's cpuinfo; else what `platform` knows). Recorded beside the
    GPU because host-bound work, such as the eager peer baseline, moves with it between machines."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
                    f"host {host_cpu()} x{os.cpu_count()}")
        return f"CPU {host_cpu()} x{os.cpu_count()}, torch {torch.__version__}"
    except ImportError:
        return f"CPU {host_cpu()} x{os.cpu_count()}"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def append_results(name: str, command: str, rows: list[dict], notes: str = "") -> str:
    """Print and append a section; returns the markdown. Set VPMOE_RESULTS to redirect (tests)."""
    path = Path(os.environ.get("VPMOE_RESULTS", RESULTS))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## {name}: {stamp}\n\n- device: {device_name()}\n- git: {git_sha(short=12)}\n"
            f"- command: `{command}`\n" + (f"- notes: {notes}\n" if notes else "") + "\n" + markdown_table(rows))
    print(markdown_table(rows))
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppend-only; each section is one run (bench/results.py).\n")
    with open(path, "a") as f:
        f.write(text)
    return text


def this_command() -> str:
    """The benchmark's command line as it was run (for a section's `command`)."""
    return f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def report(name: str, rows: list[dict], record: bool, notes: str = "", command: str | None = None) -> None:
    """A benchmark's ending: with `record`, append its section (`append_results`, which prints the
    table); without, print the notes and the table."""
    if record:
        append_results(name, command or this_command(), rows, notes)
        return
    if notes:
        print(notes)
    print(markdown_table(rows))

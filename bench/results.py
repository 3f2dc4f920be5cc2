"""Append a benchmark's figures to bench/RESULTS.md with device, date and git sha.

Every benchmark prints its table and calls `append_results(name, command, rows)`; the file is
append-only history, newest at the bottom, so figures from different runs are never mixed up.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def git_sha() -> str:
    """HEAD's short sha (+dirty); where git or .git is missing (the GPU machine gets no .git),
    the sha that bench/gpu_run.sh exports from .carry/GIT_SHA (written before the run)."""
    env = os.environ.get("VPMOE_GIT_SHA")
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        sha = out.stdout.strip()
        if not sha:
            return env or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return env or "unknown"


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
        return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"
    except ImportError:
        return f"CPU {platform.machine()} x{os.cpu_count()}"


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
    text = (f"\n## {name}: {stamp}\n\n- device: {device_name()}\n- git: {git_sha()}\n"
            f"- command: `{command}`\n" + (f"- notes: {notes}\n" if notes else "") + "\n" + markdown_table(rows))
    print(markdown_table(rows))
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppend-only; each section is one run (bench/results.py).\n")
    with open(path, "a") as f:
        f.write(text)
    return text

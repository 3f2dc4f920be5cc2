"""Small helpers shared across vpmoe and bench/ that belong to no one subpackage.

`git_sha` records which code produced a dataset manifest, a checkpoint or a benchmark figure;
`file_sha256` fingerprints shards, checkpoints, source files, eval bundles and the tokenizer vocab.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

GIT_SHA_ENV = "VPMOE_GIT_SHA"


def git_sha(short: int | None = None) -> str:
    """$VPMOE_GIT_SHA when set (bench/gpu_run.sh exports it from .carry/GIT_SHA, written before a
    GPU run: the copy of the tree there may carry a stale .git), else HEAD's sha (its first
    `short` hex digits when given) plus "+dirty" when tracked files differ from HEAD, else "unknown"."""
    here = Path(__file__).resolve().parent
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    fallback = "unknown"
    rev_parse = ["git", "rev-parse", *([f"--short={short}"] if short else []), "HEAD"]
    try:
        sha = subprocess.run(rev_parse, capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
        if not sha:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in `block`-byte pieces (shards and checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()

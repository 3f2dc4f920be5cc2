"""`vpmoe teacher score` and `vpmoe teacher verify` (registered by vpmoe/cli.py).

Design choice: KD errors (vpmoe.kd.KDError: bad cache, teacher failure, data mismatch) are re-raised
as vpmoe.config.ConfigError, which the dispatcher prints as one line with exit 2 (not
vpmoe.cli.UserError: `python -m vpmoe.cli` loads that module twice and would not recognise it).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading

from vpmoe.config import ConfigError, from_dict
from vpmoe.kd import KDError


def _user_errors(fn):
    @functools.wraps(fn)
    def run(args: argparse.Namespace):
        try:
            return fn(args)
        except KDError as e:
            raise ConfigError(str(e)) from None
    return run


@_user_errors
def cmd_score(args: argparse.Namespace) -> None:
    from vpmoe.kd.cache import CacheSpec
    from vpmoe.kd.score import score
    from vpmoe.kd.teacher import load_teacher_config

    teacher = load_teacher_config(args.teacher)
    spec = from_dict(CacheSpec, {"top_k": args.top_k, "tail_samples": args.tail_samples, "codec": args.codec,
                                 "lp_bits": args.lp_bits if args.lp_bits else (5 if args.codec == "rice" else 8)})
    try:
        summary = score(args.data, teacher, args.out, spec, split=args.split, rank=args.rank, world=args.world,
                        progress=not args.quiet, seed=args.seed)
    except KeyboardInterrupt:  # the shard in progress was discarded; finished ones stay
        message = f"interrupted: the finished shards in {args.out} are kept; the same command resumes"
        if teacher.backend == "vllm" and threading.active_count() > 1:  # a request on the wire: not its timeout
            print(f"vpmoe teacher: {message}", file=sys.stderr, flush=True)
            os._exit(2)
        raise ConfigError(message) from None
    print(json.dumps(summary))


@_user_errors
def cmd_verify(args: argparse.Namespace) -> None:
    from vpmoe.kd.cache import CacheError, TeacherCache, verify_cache
    from vpmoe.kd.score import data_manifest, data_split_hash, tokenizer_sha

    report = verify_cache(args.cache, full=not args.quick)
    if args.data:
        cache = TeacherCache(args.cache)
        manifest = data_manifest(args.data)
        split = cache.manifest.get("split", "train")
        from vpmoe.kd.cache import check_hashes

        check_hashes(cache.manifest, args.cache, tokenizer_sha(manifest), data_split_hash(manifest, split))
        if [(s["name"], s["rows"]) for s in manifest["shards"][split]] != \
                [(s["name"], s["rows"]) for s in cache.manifest["shards"]]:
            raise CacheError(f"{args.cache}: shard list differs from {args.data} split {split}")
        report["data"] = "matches"
    print(json.dumps(report, indent=1))


def register(subparsers) -> None:
    p = subparsers.add_parser("teacher", help="score data with a teacher into a cache; verify a cache")
    sub = p.add_subparsers(dest="teacher_command", required=True)
    s = sub.add_parser("score", help="one teacher forward per packed row; cache top-k at supervised positions")
    s.add_argument("--data", required=True, help="dataset directory built by `vpmoe data build`")
    s.add_argument("--teacher", required=True, help="teacher TOML with a [teacher] table (configs/teacher_*.toml)")
    s.add_argument("--out", required=True, help="cache directory (created; an existing one is resumed)")
    s.add_argument("--top-k", type=int, default=64)
    s.add_argument("--tail-samples", type=int, default=0, help="ids sampled from outside the top-k (hf only)")
    s.add_argument("--codec", choices=["rice", "fixed"], default="rice")
    s.add_argument("--lp-bits", type=int, default=0, help="log-prob code bits (default 5 rice, 8 fixed)")
    s.add_argument("--split", default="train")
    s.add_argument("--rank", type=int, default=None, help="this process's rank (default $RANK or 0)")
    s.add_argument("--world", type=int, default=None, help="number of processes (default $WORLD_SIZE or 1)")
    s.add_argument("--seed", type=int, default=0, help="seed of the tail samples")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_score)
    v = sub.add_parser("verify", help="check a cache: every shard complete, sizes, index, checksums")
    v.add_argument("cache")
    v.add_argument("--data", default=None, help="also check it matches this dataset (tokenizer, shard hashes)")
    v.add_argument("--quick", action="store_true", help="skip the sha256 pass over the data files")
    v.set_defaults(func=cmd_verify)

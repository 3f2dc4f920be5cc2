"""`vpmoe data render|build|verify`: thin argparse wrappers over render_file, build and verify.

Design choice: data and tokenizer errors (DataError, TokenizerError) are re-raised as
`vpmoe.config.ConfigError`, which the dispatcher prints as one line with exit 2 (ConfigError rather
than vpmoe.cli.UserError because `python -m vpmoe.cli` loads that module twice, as `__main__` and
as `vpmoe.cli`, and the dispatcher would not recognise the second class). `verify` reports a bad
dataset with exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys


def _user_errors(fn):
    def run(args: argparse.Namespace):
        from vpmoe.config import ConfigError
        from vpmoe.data import DataError
        from vpmoe.tokenizer import TokenizerError

        try:
            return fn(args)
        except (DataError, TokenizerError) as e:
            raise ConfigError(str(e)) from None
    return run


@_user_errors
def cmd_render(args: argparse.Namespace) -> int:
    from vpmoe.data.prompt import load_prompt
    from vpmoe.data.render import render_file

    n = render_file(args.input, args.out, load_prompt(args.prompt), renderer=args.renderer,
                    progress=not args.quiet)
    print(f"rendered {n} rows -> {args.out}")
    return 0


@_user_errors
def cmd_build(args: argparse.Namespace) -> int:
    from vpmoe.data.build import build
    from vpmoe.data.sources import open_source

    source = open_source(args.input, split=args.hf_split)
    manifest = build(args.input, args.out, args.seq_len, prompt_path=args.prompt,
                     valid_fraction=args.valid_fraction, workers=args.workers, strict=args.strict,
                     chunk_rows=args.chunk_rows, renderer=args.renderer, check_every=args.check_every,
                     progress=not args.quiet, source=source)
    counts = manifest["counts"]
    skipped = {k: v for k, v in counts["rows_skipped"].items() if v}
    print(f"rows in {counts['rows_in']}, kept {counts['rows_kept']}, skipped {sum(skipped.values())} "
          f"{json.dumps(skipped) if skipped else ''}")
    for split, c in counts["splits"].items():
        print(f"{split:>5}: {c['docs']} docs in {c['rows']} rows of {args.seq_len}, {c['tokens']:,} tokens, "
              f"packing {100 * c['packing_efficiency']:.1f}%, supervised reasoning "
              f"{c['supervised_tokens']['reasoning']:,} final {c['supervised_tokens']['final']:,}")
    if counts.get("duplicate_row_ids"):
        print(f"warning: {counts['duplicate_row_ids']} repeated row ids kept (they weigh double): "
              + "; ".join(counts["duplicate_examples"][:3]), file=sys.stderr)
    print(f"manifest: {args.out}/manifest.json")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from vpmoe.data import DataError
    from vpmoe.data.verify import verify

    try:
        result = verify(args.dir, progress=not args.quiet)
    except DataError as e:
        print(f"vpmoe data verify: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"OK: {result['files']} files, {result['bytes']:,} bytes match manifest "
          f"{result['manifest_sha256'][:12]}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="render SYNTH to Harmony tokens, build and verify shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("render", help="SYNTH parquet -> (row_id, tokens, loss_mask, span_id) parquet")
    p.add_argument("input", help="parquet with query, synthetic_reasoning, synthetic_answer, synth_id|row_id")
    p.add_argument("--prompt", default=None, help="prompt JSON (default: vpmoe/assets/harmony_prompt.json)")
    p.add_argument("--out", required=True, help="output parquet (written to a temp name, then renamed)")
    p.add_argument("--renderer", choices=["harmony", "fast"], default="harmony",
                   help="harmony: official renderer per row (default); fast: identical tokens, tiktoken content")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("build", help="SYNTH -> truncated, split, packed .bin/.idx shards + manifest (resumable)")
    p.add_argument("--input", required=True, help="parquet file/folder, a save_to_disk folder, or hf:NAME[@REV]")
    p.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    p.add_argument("--seq-len", type=int, required=True, help="row length in tokens")
    p.add_argument("--prompt", default=None, help="prompt JSON (default: vpmoe/assets/harmony_prompt.json)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="fraction of row ids hashed to valid")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--strict", action="store_true", help="the first malformed row is an error")
    p.add_argument("--chunk-rows", type=int, default=65536, help="input rows per work unit / shard")
    p.add_argument("--renderer", choices=["harmony", "fast"], default="fast")
    p.add_argument("--check-every", type=int, default=256,
                   help="fast renderer: re-render every Nth row with openai-harmony and compare (0: never)")
    p.add_argument("--hf-split", default="train", help="split of a hub or saved DatasetDict input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("verify", help="check every shard against manifest.json (exit 1 on the first bad file)")
    p.add_argument("dir", help="a folder written by `vpmoe data build`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

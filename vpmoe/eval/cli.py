"""`vpmoe eval MODEL --suite NAME --out REPORT.json`, `vpmoe eval RUN_DIR --every-checkpoint
[--watch]` (one report per checkpoint, curves: vpmoe/eval/watch.py) and `vpmoe eval fetch-bundle`.

Design choices:
- One command, one report: MODEL is an HF causal-LM directory (our export, a parent Qwen3, a
  teacher) or a vpmoe training checkpoint (loading.py). Suites run in a fixed order and everything
  they need is checked before the model is loaded, so a missing bundle or data folder fails in a
  second with a message that says how to fix it.
- `--suite all` runs every suite whose inputs exist and records the others as skipped with the
  reason; naming a suite explicitly makes its missing input an error.
- `fetch-bundle` is a first positional value rather than a sub-subcommand, so `vpmoe eval MODEL`
  stays the short form the brief and the docs use.
- `run_eval(...)` is the same thing as a function (tests and the trainer can call it in-process).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

from vpmoe.cli import UserError

SUITES = ("core8", "ppl", "format", "numeric", "router")


def log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def versions() -> dict:
    import torch
    import transformers

    import vpmoe
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vpmoe": vpmoe.__version__}


def plan_suites(suite: str, bundle: str | None, data: str | None) -> tuple[list[str], dict, Path | None]:
    """(suites to run, {suite: skip reason}, bundle dir) — raises UserError on a named suite's missing input."""
    from vpmoe.eval.core import resolve_bundle_dir

    wanted = list(SUITES) if suite == "all" else [suite]
    skipped, bundle_dir = {}, None
    if "core8" in wanted:
        try:
            bundle_dir = resolve_bundle_dir(bundle)
        except UserError as e:
            if suite != "all":
                raise
            skipped["core8"] = str(e)
    if "ppl" in wanted and not data:
        if suite != "all":
            raise UserError("--suite ppl needs --data DIR (shards built by `vpmoe data build`; the valid split is used)")
        skipped["ppl"] = "no --data given"
    if data and not Path(data).is_dir():
        raise UserError(f"--data {data}: not a directory")
    return [s for s in wanted if s not in skipped], skipped, bundle_dir


def run_eval(model_path: str, suite: str, out: str, baseline: str | None = None, bundle: str | None = None,
             data: str | None = None, max_per_task: int | None = None, seed: int = 0, device: str = "auto",
             dtype: str = "auto", tasks: list[str] | None = None, batch_tokens: int = 8192,
             format_n: int = 16, format_max_new_tokens: int = 512, numeric_n: int = 70,
             ppl_max_rows: int | None = None, details: bool = False, png: str | None = None) -> dict:
    import torch

    from vpmoe.eval import report as rep
    from vpmoe.eval.loading import load_model

    if suite not in SUITES + ("all",):
        raise UserError(f"--suite {suite!r}: expected one of {', '.join(SUITES + ('all',))}")
    if baseline:
        rep.read_report(baseline)  # fail before the expensive part
    started = dt.datetime.now(dt.timezone.utc)
    suites_to_run, skipped, bundle_dir = plan_suites(suite, bundle, data)
    if "core8" in suites_to_run:
        from vpmoe.eval.core import check_named_tasks
        check_named_tasks(bundle_dir, tasks, require_one=suite == "core8")
    data_info = {}
    shards = None
    if data and any(s in suites_to_run for s in ("ppl", "format", "router")):
        from vpmoe.eval.ppl import open_heldout
        shards = open_heldout(data)
        data_info["shards"] = shards.describe()

    torch.manual_seed(seed)
    log(f"loading {model_path}")
    loaded = load_model(model_path, device=device, dtype=dtype)
    tok = loaded.tokenizer
    if shards is not None:
        shards.check_tokenizer(tok)

    results: dict = {name: {"skipped": why} for name, why in skipped.items()}
    wall: dict = {}
    for name in suites_to_run:
        t0 = time.perf_counter()
        log(f"suite {name}")
        try:
            _run_suite(name, results, data_info, loaded, shards, bundle_dir, tasks, seed, max_per_task,
                       batch_tokens, details, format_n, format_max_new_tokens, numeric_n, ppl_max_rows)
        except UserError as e:  # a vocabulary-subset model whose inputs fall outside it: under "all", the rest runs
            if suite != "all" or "vocab_subset" not in loaded.info:
                raise
            results[name] = {"skipped": str(e)}
            log(f"{name} skipped: {e}")
        wall[name] = round(time.perf_counter() - t0, 3)

    config = {"suite": suite, "suites_run": suites_to_run, "seed": seed, "max_per_task": max_per_task,
              "tasks": tasks, "bundle": str(bundle_dir) if bundle_dir else None, "data": data,
              "device": device, "dtype": dtype, "batch_tokens": batch_tokens, "format_n": format_n,
              "format_max_new_tokens": format_max_new_tokens, "numeric_n": numeric_n,
              "ppl_max_rows": ppl_max_rows, "details": details}
    png_path = png or str(Path(out).with_suffix(".png"))
    timestamps = {"started_utc": started.isoformat(timespec="seconds"),
                  "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "wall_seconds": wall}
    report = rep.build_report(loaded.info, config, data_info, results, timestamps, versions(), baseline, png_path)
    rep.write_report(report, out)
    rep.plot_summary(report, png_path)
    log(f"wrote {out} and {png_path}")
    return report


def _run_suite(name: str, results: dict, data_info: dict, loaded, shards, bundle_dir, tasks, seed: int,
               max_per_task, batch_tokens: int, details: bool, format_n: int, format_max_new_tokens: int,
               numeric_n: int, ppl_max_rows) -> None:
    """One suite of `run_eval` into `results[name]` (and the bundle's record into `data_info`)."""
    model, tok = loaded.model, loaded.tokenizer
    if name == "core8":
        from vpmoe.eval.core import run_core
        results[name] = run_core(model, tok, bundle_dir, tasks=tasks, seed=seed, max_per_task=max_per_task,
                                 batch_tokens=batch_tokens, details=details, progress=log)
        data_info["bundle"] = {"path": str(bundle_dir), "files_sha256": results[name].pop("bundle_files_sha256")}
        if results[name]["missing"]:  # the default CORE-8 or "all" on a partial bundle: said, not hidden
            log(f"core8: {results[name]['mean_note']}")
    elif name == "ppl":
        from vpmoe.eval.ppl import evaluate_batches
        results[name] = {"source": "valid split", **evaluate_batches(model, shards.batches(), ppl_max_rows, log)}
    elif name == "format":
        from vpmoe.eval.format import BUILTIN_USER_PROMPTS, render_prompts, run_format
        if shards is not None and tok.o200k_compatible:
            prompts, source = shards.prompts(format_n), "valid split"
        else:
            prompts, source = render_prompts(list(BUILTIN_USER_PROMPTS[:format_n])), "builtin"
        results[name] = run_format(model, tok, prompts, format_max_new_tokens, seed, source, progress=log)
    elif name == "numeric":
        from vpmoe.eval.numeric import run_numeric
        results[name] = run_numeric(model, tok, numeric_n, seed, batch_tokens)
    elif name == "router":
        from vpmoe.eval.router import run_router
        if shards is not None:
            docs, source = shards.documents(max_docs=64), "valid split"
        else:
            docs, source = builtin_router_documents(tok), "builtin"
        results[name] = run_router(model, docs, source)


def builtin_router_documents(tok) -> list[list[int]]:
    """Held-out text when no --data: the Harmony prompts (o200k) or plain user texts, plus numbers."""
    from vpmoe.eval.format import BUILTIN_USER_PROMPTS, render_prompts
    from vpmoe.eval.numeric import NUMBER_STRINGS

    if tok.o200k_compatible:
        docs = render_prompts(list(BUILTIN_USER_PROMPTS))
    else:
        docs = [tok.encode_ordinary(t) for t in BUILTIN_USER_PROMPTS]
    return docs + [tok.encode_ordinary(" ".join(NUMBER_STRINGS))]


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model == "fetch-bundle":
        from vpmoe.eval.core import fetch_bundle
        kwargs = {}
        if args.sha256:  # 'none' skips the check (a bundle you built yourself)
            kwargs["sha256"] = None if args.sha256.lower() == "none" else args.sha256
        if args.url:
            kwargs["url"] = args.url
        path = fetch_bundle(args.out, zip_path=args.zip, **kwargs)
        print(f"CORE eval bundle ready at {path} (use --bundle {path} or set VPMOE_EVAL_BUNDLE)")
        return 0
    if args.watch and not args.every_checkpoint:
        raise UserError("--watch goes with --every-checkpoint (a training run directory as MODEL)")
    if not args.out and not args.every_checkpoint:
        raise UserError("--out REPORT.json is required")
    if args.max_per_task is not None and args.max_per_task < 1:
        raise UserError(f"--max-per-task must be >= 1, got {args.max_per_task}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    kwargs = dict(suite=args.suite, baseline=args.baseline, bundle=args.bundle, data=args.data,
                  max_per_task=args.max_per_task, seed=args.seed, device=args.device, dtype=args.dtype,
                  tasks=tasks, batch_tokens=args.batch_tokens, format_n=args.format_n,
                  format_max_new_tokens=args.format_max_new_tokens, numeric_n=args.numeric_n,
                  ppl_max_rows=args.ppl_max_rows, details=args.details)
    if args.every_checkpoint:
        from vpmoe.eval.watch import evaluate_run
        try:
            curves = evaluate_run(args.model, args.out, watch=args.watch, poll_seconds=args.poll_seconds, log=log,
                                  **kwargs)
        except KeyboardInterrupt:  # reports are written under temporary names: the finished ones are whole
            raise UserError("interrupted: the reports written so far are kept; the same command continues") from None
        log(f"evaluated now: steps {curves['evaluated_now']}; reports for steps {curves['steps']}")
        return 0
    report = run_eval(args.model, out=args.out, png=args.png, **kwargs)
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    rows = report["summary"]
    deltas = (report.get("baseline") or {}).get("deltas", {})
    differ = (report.get("baseline") or {}).get("options_differ")
    if differ:
        log("the baseline was evaluated with other settings ("
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
            + "): its deltas compare two different evaluations")
    width = max((len(k) for k in rows), default=10)
    for key, value in rows.items():
        extra = f"  ({deltas[key]['delta']:+.4f} vs baseline)" if key in deltas else ""
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}{extra}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model (CORE-8, held-out span NLL, Harmony format, numbers, router)",
        description="vpmoe eval MODEL --suite NAME --out REPORT.json  |  vpmoe eval fetch-bundle [--out DIR]")
    p.add_argument("model", help="HF causal-LM dir or vpmoe checkpoint dir; or the word fetch-bundle")
    p.add_argument("--suite", default="all", help=f"one of {', '.join(SUITES)}, all (default all)")
    p.add_argument("--out", help="report JSON path (eval); bundle folder (fetch-bundle)")
    p.add_argument("--baseline", help="an earlier report JSON: deltas go into the report")
    p.add_argument("--bundle", help="CORE eval bundle dir (default $VPMOE_EVAL_BUNDLE or ~/.cache/vpmoe/eval_bundle)")
    p.add_argument("--data", help="shards dir from `vpmoe data build` (valid split): ppl, and held-out prompts")
    p.add_argument("--tasks", help="comma list of CORE task labels (default the CORE-8), or 'all' for core.yaml's")
    p.add_argument("--max-per-task", type=int, default=None, help="items per CORE task (seeded shuffle); default all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per scoring batch")
    p.add_argument("--format-n", type=int, default=16, help="prompts for the format suite")
    p.add_argument("--format-max-new-tokens", type=int, default=512)
    p.add_argument("--numeric-n", type=int, default=70, help="number-copy prompts")
    p.add_argument("--ppl-max-rows", type=int, default=None, help="cap on valid rows for ppl (default all)")
    p.add_argument("--details", action="store_true", help="keep per-item CORE records in the report")
    p.add_argument("--png", help="summary PNG path (default: the report path with .png)")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="MODEL is a training run dir: evaluate each checkpoint without a report in --out "
                        "(default RUN/eval/step_N.json), then write curves.json/png and TensorBoard eval/*")
    p.add_argument("--watch", action="store_true",
                   help="with --every-checkpoint: keep polling until the run's last step is evaluated")
    p.add_argument("--poll-seconds", type=float, default=60.0, help="--watch: seconds between looks")
    p.add_argument("--zip", help="fetch-bundle: install from this local zip instead of downloading")
    p.add_argument("--url", help="fetch-bundle: download from this URL instead of nanochat's")
    p.add_argument("--sha256", help="fetch-bundle: expected sha256 (default the pinned one; 'none' skips)")
    p.set_defaults(func=cmd_eval)

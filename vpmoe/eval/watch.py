"""Evaluation throughout a run: `vpmoe eval RUN_DIR --every-checkpoint [--watch]`.

Design choices:
- A sidecar, not a trainer hook: evaluation runs in its own process (another GPU, or the CPU),
  reads the checkpoints the trainer publishes (a directory without `.tmp` is complete) and never
  slows or risks the training job. The same `run_eval` as for one model, one report per step.
- The reports are the state: `OUT/step_000500.json` exists = step 500 is done (reports are
  written to a temporary name and renamed). A restarted watcher skips what is done; curves are
  rebuilt from the reports every time, so they can never disagree with them.
- Every report in one folder comes from the same evaluation settings: a folder whose reports were
  made with other settings (another suite, tasks, items per task...; `report.options_differ`) is
  refused before anything runs, so curves never mix two evaluations.
- `--watch` polls for new checkpoints until the run's last step (train.steps of its provenance)
  has a report. A checkpoint the trainer deletes (checkpoint.keep) before its turn is skipped with
  a message; anything else that fails stops the watcher with the error.
- Outputs: `OUT/curves.json` (step -> every numeric summary metric), `OUT/curves.png`, and
  TensorBoard scalars `eval/<metric>` in `RUN_DIR/tb/eval` (next to the trainer's curves).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from vpmoe.cli import UserError

REPORT = "step_{:06d}.json"


def _report_path(out: Path, step: int) -> Path:
    return out / REPORT.format(step)


def final_step(checkpoint: Path) -> int | None:
    """train.steps of the run that wrote `checkpoint` (its provenance record); None if unreadable
    (e.g. rotated away meanwhile)."""
    from vpmoe.train.checkpoint import CheckpointError, read_provenance

    try:
        return int(read_provenance(checkpoint)["config"]["train"]["steps"])
    except (CheckpointError, ValueError, KeyError, TypeError):
        return None


def pending(run_dir: Path, out: Path) -> list[tuple[int, Path]]:
    from vpmoe.train.checkpoint import list_checkpoints

    return [(step, path) for step, path in list_checkpoints(run_dir) if not _report_path(out, step).is_file()]


def check_reports_match(out: Path, eval_kwargs: dict) -> None:
    """Refuse a folder whose step reports were made with other result-changing settings."""
    import inspect

    from vpmoe.eval.cli import run_eval
    from vpmoe.eval.report import options_differ

    defaults = {k: p.default for k, p in inspect.signature(run_eval).parameters.items()
                if p.default is not inspect.Parameter.empty}
    wanted = {**defaults, **eval_kwargs}
    for path in sorted(out.glob("step_*.json")):
        try:
            config = json.loads(path.read_text())["config"]
        except (KeyError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a vpmoe eval report ({e!r}); move it out of {out}") from None
        differ = options_differ(config, wanted)
        if differ:
            raise UserError(f"{path}: made with other settings ("
                            + ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in differ.items())
                            + f"); evaluate into another --out folder, or delete the reports in {out} to redo them")


def collect_curves(out: Path) -> dict:
    """{"steps": [...], "metrics": {name: [value or None per step]}} from every step report in `out`."""
    reports = {}
    for path in sorted(out.glob("step_*.json")):
        try:
            step = int(path.stem.split("_")[1])
            reports[step] = json.loads(path.read_text())["summary"]
        except (ValueError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a vpmoe eval report ({e!r}); move it out of {out}") from None
    steps = sorted(reports)
    names = sorted({k for s in reports.values() for k, v in s.items() if _is_number(v)})
    metrics = {k: [reports[s][k] if _is_number(reports[s].get(k)) else None for s in steps] for k in names}
    return {"steps": steps, "metrics": metrics}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_curves(out: Path) -> dict:
    curves = collect_curves(out)
    tmp = out / "curves.json.tmp"
    tmp.write_text(json.dumps(curves, indent=1) + "\n")
    os.replace(tmp, out / "curves.json")
    if curves["steps"]:
        plot_curves(curves, out / "curves.png")
    return curves


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves["metrics"])
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(s, v) for s, v in zip(curves["steps"], curves["metrics"][name]) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard not installed: the JSON and PNG curves still are written
        return None
    return SummaryWriter(str(run_dir / "tb" / "eval"))


def evaluate_run(run_dir: str | Path, out: str | Path | None, watch: bool = False, poll_seconds: float = 60.0,
                 log=print, **eval_kwargs) -> dict:
    """Evaluate every complete checkpoint of `run_dir` that has no report in `out` (default
    RUN_DIR/eval), oldest first; with `watch`, keep polling until the run's last step is done.
    `eval_kwargs` go to `vpmoe.eval.cli.run_eval`. Returns the curves."""
    from vpmoe.eval.cli import run_eval
    from vpmoe.train.checkpoint import checkpoint_dir, list_checkpoints

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "eval"
    if not checkpoint_dir(run_dir).is_dir() and not watch:
        raise UserError(f"{run_dir}: no checkpoints/ folder; --every-checkpoint takes a training run directory")
    out.mkdir(parents=True, exist_ok=True)
    check_reports_match(out, eval_kwargs)
    writer = None
    last, said = None, -1
    evaluated = []
    try:
        while True:
            for step, path in pending(run_dir, out):
                log(f"checkpoint step {step}: {path}")
                try:
                    report = run_eval(str(path), out=str(_report_path(out, step)), **eval_kwargs)
                except Exception:
                    if not path.exists():  # rotated away by checkpoint.keep while we were busy
                        log(f"checkpoint step {step} was deleted before it could be evaluated; skipped")
                        continue
                    raise
                evaluated.append(step)
                writer = writer or _tensorboard(run_dir)
                if writer is not None:
                    for name, value in report["summary"].items():
                        if _is_number(value):
                            writer.add_scalar(f"eval/{name}", value, step)
                    writer.flush()
                write_curves(out)
            done = list_checkpoints(run_dir)
            if done:
                last = final_step(done[-1][1])
            if not watch or (last is not None and _report_path(out, last).is_file()):
                break
            if said != len(done):  # once per state: a run that died would otherwise look like a quiet one
                log(f"waiting for checkpoints in {checkpoint_dir(run_dir)} (until step {last or '?'} has a report; "
                    "a run that stopped for good never gets there: Ctrl-C ends the watch)")
                said = len(done)
            time.sleep(poll_seconds)
    finally:
        if writer is not None:
            writer.close()
    return {**write_curves(out), "evaluated_now": evaluated}

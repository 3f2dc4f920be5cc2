"""`vpmoe report RUN_DIR`: PNG plots and a short markdown summary of a training run.

Design choices:
- Reads only the run's own files (`metrics.jsonl`, `expert_load.jsonl`, `run_config.json`), so a
  report can be made while the run is going, after it died, or on another machine.
- When a step was logged twice (a run resumed after being killed), the last record wins.
- Plots (matplotlib, Agg backend, into `RUN/report/`): loss per span with the held-out loss per
  span on the same axes (a KD run: the train CE, which every step logs, since its objective
  alternates between KD and CE steps; its KL and teacher log-prob over the KD steps in `kd.png`);
  lr and grad norm; tokens/s and MFU; router health (aux loss, load entropy, dead experts); the expert-load heatmap (layer x expert, share of the layer's tokens,
  latest logged step) and the per-layer load entropy over steps. Every file is written under a
  temporary name and renamed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vpmoe.config import ConfigError
from vpmoe.train.metrics import read_jsonl


def _by_step(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    latest: dict[int, float] = {}
    for rec in records:
        if key in rec and isinstance(rec[key], (int, float)):
            latest[int(rec["step"])] = float(rec[key])
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _plot_lines(plt, path: Path, title: str, series: list[tuple[str, str, list, list]], ylabel: str = "",
                log_y: bool = False) -> bool:
    series = [s for s in series if s[2]]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, style, xs, ys in series:
        ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return True


def _plot_layer_heatmap(plt, path: Path, grid: np.ndarray, title: str, xlabel: str, **imshow_kw) -> None:
    """One heatmap with a row per MoE layer (rows = grid's first axis) and a colorbar; `imshow_kw`
    (cmap, vmin/vmax, extent) go to imshow."""
    n_layers = grid.shape[0]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * n_layers + 1.5)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", **imshow_kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    plt.close(fig)


def _kd_steps(records: list[dict]) -> list[dict] | None:
    """A KD run's records of its KD steps (the ones with teacher figures); None for a run without KD."""
    if not any("kd_step" in r for r in records):
        return None
    return [r for r in records if r.get("kd_step") == 1]


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report/*.png and RUN/report/summary.md; returns the summary path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: missing or empty; is {run_dir} a training run directory?")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    made = []
    spans = ("reasoning", "final")
    # a KD run's objective alternates between KD and CE steps: its train curve is the CE, which
    # every step logs, and the teacher figures get their own plot over the KD steps
    kd_records = _kd_steps(records)
    train, name = ("ce", "CE") if kd_records is not None else ("loss", "loss")
    loss_series = [(f"train {s}" if train == "loss" else f"train CE {s}", "-", *_by_step(records, f"{train}/{s}"))
                   for s in spans]
    loss_series += [(f"held-out {s}", "o--", *_by_step(records, f"valid/loss/{s}")) for s in spans]
    if _plot_lines(plt, out / "loss.png", f"{name} per span (train and held-out)", loss_series, "nats/token"):
        made.append("loss.png")
    if kd_records is not None and _plot_lines(
            plt, out / "kd.png", "KD steps: KL to the teacher and the teacher's log-prob of the label",
            [(f"{key} {s}", "-", *_by_step(kd_records, f"{key}/{s}")) for key in ("kl", "teacher_logp") for s in spans],
            "nats/token"):
        made.append("kd.png")
    if _plot_lines(plt, out / "lr_gradnorm.png", "learning rate and grad norm",
                   [("lr", "-", *_by_step(records, "lr")), ("grad norm", "-", *_by_step(records, "grad_norm"))],
                   log_y=True):
        made.append("lr_gradnorm.png")
    if _plot_lines(plt, out / "throughput.png", "throughput", [("tokens/s", "-", *_by_step(records, "tokens_per_s"))]):
        made.append("throughput.png")
    if _plot_lines(plt, out / "router.png", "router health",
                   [("load entropy (mean, 1 = even)", "-", *_by_step(records, "router/entropy_mean")),
                    ("load entropy (worst layer)", "-", *_by_step(records, "router/entropy_min")),
                    ("min load / mean (worst layer)", "-", *_by_step(records, "router/min_over_mean"))]):
        made.append("router.png")
    loads = read_jsonl(run_dir / "expert_load.jsonl")
    if loads:
        last = {int(r["step"]): r for r in loads}
        final = last[max(last)]
        load = np.asarray(final["load"], dtype=np.float64)
        share = load / np.maximum(load.sum(1, keepdims=True), 1)
        _plot_layer_heatmap(plt, out / "expert_load.png", share * load.shape[1],
                            f"expert load at step {final['step']} (share x n_experts; 1 = even)", "expert",
                            cmap="viridis")
        made.append("expert_load.png")
    entropy_rows = [(int(r["step"]), r["router/entropy_per_layer"]) for r in records if "router/entropy_per_layer" in r]
    if entropy_rows:
        latest = dict(entropy_rows)
        steps = sorted(latest)
        grid = np.asarray([latest[s] for s in steps]).T
        _plot_layer_heatmap(plt, out / "expert_entropy.png", grid, "expert-load entropy per MoE layer (1 = even)",
                            "step", cmap="magma", vmin=0, vmax=1,
                            extent=(steps[0], steps[-1], grid.shape[0] - 0.5, -0.5))
        made.append("expert_entropy.png")
    summary = _summary(run_dir, records, made)
    path = out / "summary.md"
    tmp = path.with_name("summary.md.tmp")
    tmp.write_text(summary)
    os.replace(tmp, path)
    return path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:.4g}" if isinstance(v, float) and (abs(v) < 1e-3 or abs(v) >= 1e5) else (
        f"{v:.4f}" if isinstance(v, float) else str(v))


def _summary(run_dir: Path, records: list[dict], images: list[str]) -> str:
    steps = sorted({int(r["step"]) for r in records})
    first = lambda key: next(iter(_by_step(records, key)[1]), None)  # noqa: E731
    last = lambda key: (_by_step(records, key)[1] or [None])[-1]  # noqa: E731
    tps = _by_step(records, "tokens_per_s")[1]
    cfg_path = run_dir / "run_config.json"
    model = json.loads(cfg_path.read_text()).get("model", {}) if cfg_path.is_file() else {}
    lines = [f"# Training report: {run_dir.name}", "",
             f"- steps logged: {steps[0]}..{steps[-1]} ({len(steps)} steps)",
             f"- tokens seen: {_fmt(last('tokens'))}",
             f"- model: d_model={model.get('d_model')}, layers={model.get('n_layers')}, "
             f"experts={model.get('n_experts')} top-{model.get('top_k')}",
             f"- median tokens/s: {_fmt(float(np.median(tps)) if tps else None)}; last MFU: {_fmt(last('mfu'))}", "",
             "| quantity | first | last |", "|---|---|---|"]
    kd_records = _kd_steps(records)  # a KD run's "loss" is KD on some steps, CE on others: not a curve
    train = ("ce/reasoning", "ce/final") if kd_records is not None else ("loss", "loss/reasoning", "loss/final")
    for key in (*train, "valid/loss", "valid/loss/reasoning", "valid/loss/final",
                "aux_loss", "grad_norm", "router/entropy_min", "router/dead_experts"):
        lines.append(f"| {key} | {_fmt(first(key))} | {_fmt(last(key))} |")
    if kd_records is not None:
        for key in ("kl/reasoning", "kl/final", "teacher_logp/reasoning", "teacher_logp/final"):
            values = _by_step(kd_records, key)[1]
            lines.append(f"| {key} (KD steps) | {_fmt(values[0] if values else None)} | "
                         f"{_fmt(values[-1] if values else None)} |")
    lines += ["", *[f"![{name}]({name})" for name in images], ""]
    curves_path = run_dir / "eval" / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.is_file() else {"steps": []}
    if curves["steps"]:  # written by `vpmoe eval RUN --every-checkpoint`
        lines += ["## Evaluations", "", f"checkpoints evaluated at steps {curves['steps']} (`{run_dir.name}/eval/`)", "",
                  f"| metric | step {curves['steps'][0]} | step {curves['steps'][-1]} |", "|---|---|---|"]
        for name, values in curves["metrics"].items():
            lines.append(f"| {name} | {_fmt(values[0])} | {_fmt(values[-1])} |")
        lines += ["", "![eval curves](../eval/curves.png)", ""]
    return "\n".join(lines)

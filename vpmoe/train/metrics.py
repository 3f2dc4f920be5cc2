"""Run observability: per-step JSONL, TensorBoard, rich progress, router health and MFU.

Design choices:
- One record per optimizer step in `RUN/metrics.jsonl` (flat keys such as `loss/reasoning`,
  `tokens_per_s`, `router/entropy_min`); held-out records carry `valid/...` keys; the same scalars
  go to TensorBoard (`RUN/tb`). Per-layer expert loads go to `RUN/expert_load.jsonl` every
  `expert_load_every` steps (they feed the report's heatmap) because they are too wide for every
  step.
- Only rank 0 writes; every value logged is already reduced over ranks by the trainer.
- On resume from step k, records after k (written by the interrupted run) are dropped by
  rewriting the files under a temporary name and renaming, and TensorBoard purges them
  (`purge_step`), so curves never double back.
- MFU = (6 * active non-embedding-lookup params + attention flops) * tokens / time / peak, where
  peak is `train.peak_flops` or, when that is 0 (the default), this device's matmul rate measured
  at the start in the run's compute dtype (the issue's definition; a spec sheet figure is wrong on
  any other GPU than the one it was written for).
  Attention flops per token per layer are 12 * heads * head_dim * mean context (QK^T and PV,
  forward + backward); mean context is the causal average T/2 for global layers and the sliding
  window's average for local ones (an upper bound with packed documents).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from vpmoe.config import ModelConfig


def router_stats(load: torch.Tensor) -> dict:
    """Health of expert loads [n_moe_layers, n_experts] (token counts summed over a step)."""
    if load.numel() == 0:
        return {}
    load = load.double()
    n_experts = load.shape[1]
    frac = load / load.sum(1, keepdim=True).clamp_min(1)
    entropy = -(frac * frac.clamp_min(1e-30).log()).sum(1) / math.log(n_experts)  # 1 = perfectly even
    mean = load.mean(1).clamp_min(1e-9)
    dead = (load == 0).sum(1)
    return {
        "router/entropy_mean": float(entropy.mean()), "router/entropy_min": float(entropy.min()),
        "router/max_over_mean": float((load.max(1).values / mean).max()),
        "router/min_over_mean": float((load.min(1).values / mean).min()),
        "router/max_over_min": float((load.max(1).values / load.min(1).values.clamp_min(1)).max()),  # min >= 1 token
        "router/dead_experts": int(dead.sum()),
        "router/entropy_per_layer": [round(float(e), 5) for e in entropy],
        "router/dead_per_layer": [int(d) for d in dead],
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training flops per token (forward + backward) for the MFU estimate."""
    from vpmoe.model.params import count_params

    counts = count_params(cfg)
    matmul_params = counts["active"] - cfg.vocab_size * cfg.d_model  # the embedding lookup is free
    attn = 0.0
    for layer in range(cfg.n_layers):
        if cfg.is_global(layer):
            ctx = (seq_len + 1) / 2
        else:
            w = min(cfg.window, seq_len)
            ctx = w - (w * w - w) / (2 * seq_len)  # mean over positions of min(i + 1, window)
        attn += 12 * cfg.n_heads * cfg.head_dim * ctx
    return 6.0 * matmul_params + attn


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, warmup: int = 3, iters: int = 10) -> float:
    """This device's dense matmul rate in flop/s, in the dtype the run computes in (bf16 on GPUs):
    the MFU denominator of the trainer (when `train.peak_flops = 0`) and of the benchmarks. The
    median of `iters` single n x n x n products (n = 8192 on CUDA, timed with CUDA events; 1024 on
    the CPU), after a warm-up: 13 products at start-up. Inputs come from their own generator, so the
    caller's RNG stream is untouched."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times)


def _rewrite_until(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (atomic rewrite); a torn last line is dropped."""
    if not path.is_file():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill
    return out


def tensorboard_scalars(record: dict) -> list[tuple[str, float]]:
    """A record's TensorBoard scalars: finite numbers under their key, number lists (per-layer
    figures) as `key/i`; strings and non-finite values are left to metrics.jsonl."""
    out = []
    for key, value in record.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append((key, float(value)))
        elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
            out.extend((f"{key}/{i}", float(v)) for i, v in enumerate(value) if math.isfinite(v))
    return out


class MetricsLogger:
    """Rank 0's writer of metrics.jsonl, expert_load.jsonl and TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.load_path = self.run_dir / "expert_load.jsonl"
        for path in (self.metrics_path, self.load_path):
            _rewrite_until(path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:  # one event per record: add_scalar per value took ~3 ms for 60 values
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in tensorboard_scalars(record)]
            self.tb._get_file_writer().add_summary(Summary(value=values), step)

    def log_expert_load(self, step: int, load: torch.Tensor) -> None:
        if not self.enabled or load.numel() == 0:
            return
        with open(self.load_path, "a") as f:
            f.write(json.dumps({"step": step, "load": load.long().tolist()}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


class Progress:
    """A rich progress bar showing step, loss, tokens/s and ETA; messages print on rank 0 only.
    Where stdout is not a terminal (nohup, a scheduler's log file) a live bar would draw only when
    it stops, so a plain line with the same figures is printed every `plain_every_s` seconds and at
    the last step instead."""

    def __init__(self, total_steps: int, start_step: int, is_main: bool, show_bar: bool,
                 terminal: bool | None = None, plain_every_s: float = 30.0):
        self.is_main, self.bar, self.plain = is_main, None, False
        if not (is_main and show_bar):
            return
        if not (sys.stdout.isatty() if terminal is None else terminal):
            self.plain, self.total, self.every = True, total_steps, plain_every_s
            self.since = (time.perf_counter(), start_step)  # the ETA's pace: this process's steps
            self.last_line = -math.inf
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), refresh_per_second=2)
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
        self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")
        elif self.plain:
            now = time.perf_counter()
            if now - self.last_line < self.every and step < self.total:
                return
            self.last_line = now
            t0, step0 = self.since
            rate = (step - step0) / max(now - t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else \
                (f"{eta / 86400:.1f} days" if math.isfinite(eta) else "?")
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  ETA {eta_text}", flush=True)

    def print(self, text: str) -> None:
        if self.bar is not None:  # unwrapped: a log line stays one line in a file (grep, bench/trainer_run.py)
            self.bar.console.print(text, soft_wrap=True)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

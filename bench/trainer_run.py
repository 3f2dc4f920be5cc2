"""`vpmoe train` itself, timed: the figures a user's run would log, beside bench/train_step.py's.

bench/train_step.py assembles the trainer's single-GPU pieces (FastBody, the static fused loss,
FastMuonAdamW, GraphedTrainStep) around random batches; this runs the real command on real packed
data (data path, prefetch thread, logging, evaluation and the final checkpoint included) and
reads the run's own metrics.jsonl. Design choices:
- The run is a subprocess (`python -m vpmoe.cli train`), exactly what a user types; overrides come
  through `--set`, so any recipe can be timed (the default is the one-GPU stage-1 recipe of
  configs/stage1.toml: the first 70 blocks checkpointed, bf16 Muon momentum, 16 rows x 4 micro-batches).
- Steady state = the median over steps after the first `--skip` (compilation, graph capture).
- MFU is the run's own: against the matmul rate the trainer measures at its start (the default
  `train.peak_flops = 0`), named in its `compute:` line.
- The time after the last step (final evaluation + checkpoint write) is reported separately.
- Where a run's step time goes: `--set train.profile_steps=4` (the trainer's own profile, written to
  the run's profile/ folder: pass `--run-dir` to keep it).

Usage (GPU machine, data carried by bench/gpu_carry.sh):
  python3 bench/trainer_run.py --data .carry/synth2048 --steps 12 --record
  python3 bench/trainer_run.py --data .carry/synth2048 --set model.n_layers=20 --set data.micro_batch_size=8 ...
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONE_GPU_RECIPE = ["train.activation_checkpointing=70", "data.micro_batch_size=16", "train.grad_accum=4"]


def run_passthrough(cmd: list[str], prefix: str = "  | ", timeout: float | None = None) -> tuple[int, list[str]]:
    """Run `cmd` from the project root, passing its output through as it comes (a run cut short by
    a time limit still shows how far it got); (exit code, its lines; None for the code when it ran
    past `timeout` seconds: then it got SIGTERM, which torchrun passes to its workers, and SIGKILL
    30 s later)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    expired = threading.Event()

    def stop():
        expired.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    timer = threading.Timer(timeout, stop) if timeout else None
    if timer:
        timer.start()
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"{prefix}{lines[-1]}", flush=True)
    code = proc.wait()
    if timer:
        timer.cancel()
    return (None if expired.is_set() else code), lines


def summarise(run_dir: Path, skip: int, compute_line: str, wall: float) -> dict:
    """Steady-state figures from the run's metrics.jsonl (training records carry grad_norm), and
    the time of the command outside its steps (start-up, evaluation, checkpoints)."""
    from vpmoe.train.metrics import read_jsonl

    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "grad_norm" in r]
    steady = [r for r in steps if r["step"] > skip] or steps
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    row = {"steps": len(steps), "steady_steps": len(steady), "step_s": med("step_time_s"),
           "tokens_per_s": med("tokens_per_s"), "data_wait_ms": 1e3 * med("data_wait_s"),
           "first_step_s": steps[0]["step_time_s"], "wall_s": wall,
           "outside_steps_s": wall - sum(r["step_time_s"] for r in steps)}
    peak = re.search(r"MFU against ([\d.]+) TFLOP/s", compute_line)  # the run's own denominator
    if peak and float(peak.group(1)) > 0:
        row["mfu"], row["peak_tflops"] = med("mfu"), float(peak.group(1))
    if "mem_gib" in steps[-1]:
        row["peak_mem_gib"] = max(r["mem_gib"] for r in steps)
    valid = [r for r in records if "valid/loss" in r]
    if valid:
        row["valid_loss"] = valid[-1]["valid/loss"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/stage1.toml"))
    ap.add_argument("--data", required=True, help="a dataset made by `vpmoe data build` (seq_len of the config)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the steady state (compile, capture)")
    ap.add_argument("--set", action="append", default=[], help="more config overrides (after the recipe)")
    ap.add_argument("--no-recipe", action="store_true", help="leave out the one-GPU recipe's overrides")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--run-dir", default="", help="keep the run here (default: a temporary folder, removed)")
    a = ap.parse_args()

    from vpmoe.config import ConfigError
    from vpmoe.train.config import load_run_config
    sets = ([] if a.no_recipe else ONE_GPU_RECIPE) + [
        f"data.path={json.dumps(str(Path(a.data).resolve()))}", f"train.steps={a.steps}", "train.eval_every=0",
        "train.eval_rows=64", "checkpoint.every=0", "checkpoint.keep=1"] + a.set
    try:  # a bad override fails here, with the config's own message naming the key
        cfg = load_run_config(a.config, sets)
    except ConfigError as e:
        raise SystemExit(f"trainer_run: {e}") from None
    with tempfile.TemporaryDirectory(prefix="trainer_run_") as tmp:
        run_dir = Path(a.run_dir) if a.run_dir else Path(tmp) / "run"
        cmd = [sys.executable, "-m", "vpmoe.cli", "train", a.config, "--run-dir", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        returncode, lines = run_passthrough(cmd)  # the lines keep its compute: line
        wall = time.perf_counter() - t0
        if returncode != 0:
            raise SystemExit(f"vpmoe train exited {returncode}")
        compute = next((ln for ln in lines if ln.startswith("compute:")), "compute: ?")
        row = summarise(run_dir, a.skip, compute, wall)
    row = {"layers": cfg.model.n_layers, "rows": cfg.data.micro_batch_size, "micro": cfg.train.grad_accum,
           "seq": cfg.data.seq_len, **row}
    command = "python3 bench/trainer_run.py " + " ".join(sys.argv[1:])
    from bench.results import report
    report("trainer_run", [row], a.record, notes=f"{compute}; overrides: {' '.join(sets)}", command=command)
    print(compute)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

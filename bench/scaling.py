"""Multi-GPU scaling of `vpmoe train` (issue H): FSDP2 data parallel and expert parallel, weak
scaling from 1 GPU to N, and the multi-GPU correctness checks, on one node.

Usage (a GPU node; the dataset from `vpmoe data build` at the config's seq_len):
  python bench/scaling.py --data DATA --gpus 1,2,4,8 --modes fsdp,ep --record
  python bench/scaling.py --data DATA --gpus 1,8 --modes fsdp,ep --check --record  # + N GPUs vs 1, resharding
  python bench/scaling.py --data DATA --gpus 1,2 --set model.n_layers=20 ...       # any recipe via --set
On a CPU (gloo, tests/test_scaling_bench.py) the same runs with `--set train.device="cpu"`.
The 1-GPU point holds the whole model, as do the replicas: on 80 GB GPUs add the one-GPU recipe's
memory settings (`--set train.activation_checkpointing=true`, configs/stage1.toml's header) to every
run, so all points train the same way.

Design choices:
- Each point is the real command, `torchrun --standalone --nproc-per-node N -m vpmoe.cli train CONFIG`
  (one plain process at N = 1), read back from the run's own metrics.jsonl: the median over the
  steps after `--skip` (compilation, capture). torchrun is the launcher; this only runs it.
- Weak scaling: the batch per GPU is fixed (`data.micro_batch_size` x `train.grad_accum` per rank,
  from the config or `--set`), so the global batch grows with N. Efficiency at N = tokens/s per
  GPU at N / tokens/s at 1 GPU, where the 1-GPU run is what `vpmoe train` does there (the fused
  single-device path with CUDA graphs): the figure a user moving from one GPU to N sees.
- Modes: `fsdp` (FSDP2 over all ranks, experts sharded like every other weight), `ep`
  (`parallel.expert_parallel` = N: the experts split over all GPUs, tokens moved by all-to-all,
  FSDP2 over the rest) and `replicate` (`parallel.data_parallel = "replicate"`: the one-device
  fused step on every GPU, gradients all-reduced). At N = 1 there is one baseline (mode "single").
- Collectives from the run's own profile (`train.profile_steps`, rank 0; after the trainer's ten
  warm-up steps on a GPU, so GPU runs need `--steps` >= 10 + `--profile-steps`): device time per
  step of the all-to-all kernels (NCCL's send/recv, which `all_to_all_single` runs; gloo's
  all_to_all on a CPU) and of the data-parallel collectives (FSDP2's all-gathers and
  reduce-scatters, the replicated gradients' all-reduces). They overlap compute on
  their own streams, so a share is of the step's time, not time the step waited.
- Each run's checkpoints are deleted once it has been read (the final one alone is ~72 GB at 80
  layers).
- `--check` at the largest N, per mode: (1) `--check-steps` steps on N ranks against 1 rank with
  N times the micro-batches (the same global batch and rows): per-step losses within `--tol`
  (relative; bf16 runs differ as two bf16 runs do: routing flips in near ties); (2) DCP resharding:
  the N-rank run's checkpoint at half the steps resumed on N/2 ranks (grad_accum doubled, the same
  global batch) gives the N-rank run's later losses within `--tol`. The exit status is 1 if a check
  fails.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trainer_run import run_passthrough, summarise

MODES = ("fsdp", "ep", "replicate")
A2A = re.compile(r"SendRecv|gloo:all_to_all")  # the EP dispatcher's all_to_all_single
# data parallel: FSDP2's all-gathers and reduce-scatters, the all-reduces of replicated gradients
DP_COMM = re.compile(r"AllGather|ReduceScatter|AllReduce|gloo:(all_gather|reduce_scatter|all_reduce|allreduce)")


def train_command(config: str, sets: list[str], ranks: int, run_dir: Path, resume: bool = False) -> list[str]:
    """`vpmoe train` as a user types it: under torchrun for N > 1 ranks, one process otherwise."""
    head = [sys.executable, "-m", "vpmoe.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        "-m", "vpmoe.cli"]
    cmd = head + ["train", config, "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_train(cmd: list[str], label: str, timeout: float) -> list[str]:
    """Run one command, its output passed through with a label; its lines. A failed or timed-out
    run stops the benchmark with its last lines."""
    print(f"# {label}: {' '.join(cmd[1:])}", flush=True)
    code, lines = run_passthrough(cmd, f"  {label} | ", timeout)
    if code != 0:
        tail = "\n".join(lines[-30:])
        what = f"ran past {timeout:.0f} s" if code is None else f"exited {code}"
        raise SystemExit(f"scaling: {label} {what}:\n{tail}")
    return lines


def drop_checkpoints(run_dir: Path) -> None:
    """A finished run's checkpoints, once read: each run writes a final one (~72 GB of weights and
    optimizer state for the 80-layer model), which a series of runs would pile up on the disk."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def resumable_copy(src: Path, dst: Path, step: int) -> None:
    """Run `src` as a run to resume from its step-`step` checkpoint: copied without its checkpoints,
    that one moved in, not copied (tens of GB at 80 layers; the node's disk holds a few)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    name = f"step_{step:06d}"
    (dst / "checkpoints").mkdir()
    shutil.move(src / "checkpoints" / name, dst / "checkpoints" / name)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from the run's metrics.jsonl (training records carry grad_norm)."""
    from vpmoe.train.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "grad_norm" in r}


def collectives(profile_dir: Path, ranks: int) -> dict:
    """Device ms per profiled step of the all-to-all kernels and of the data-parallel collectives
    (rank 0's profile); {} where the run wrote none."""
    prefix = "rank0_" if ranks > 1 else ""
    table, summary = profile_dir / f"{prefix}kernels.tsv", profile_dir / f"{prefix}summary.txt"
    if not table.exists() or not summary.exists():
        return {}
    steps = int(re.search(r"profiled steps \d+-\d+ \((\d+)\)", summary.read_text()).group(1))
    a2a = dp = 0.0
    for line in table.read_text().splitlines()[1:]:
        _, _, total_us, _, name = line.split("\t", 4)
        if A2A.search(name):
            a2a += float(total_us)
        elif DP_COMM.search(name):
            dp += float(total_us)
    return {"a2a_ms": a2a / 1e3 / steps, "dp_comm_ms": dp / 1e3 / steps}


def worst_difference(got: dict[int, float], want: dict[int, float], steps) -> float:
    """The largest relative difference of `got`'s losses from `want`'s over `steps`; a step missing
    from either is infinitely different."""
    worst = 0.0
    for s in steps:
        if s not in got or s not in want:
            return float("inf")
        worst = max(worst, abs(got[s] - want[s]) / max(abs(want[s]), 1e-12))
    return worst


def layout(mode: str, ranks: int) -> list[str]:
    """The overrides that run `mode` on `ranks` processes."""
    return [f"parallel.expert_parallel={ranks if mode == 'ep' else 1}",
            f"parallel.data_parallel={json.dumps('replicate' if mode == 'replicate' else 'fsdp')}"]


def scaling_rows(a, base_sets: list[str], tmp: Path) -> list[dict]:
    """One row per (mode, N): the run's steady-state figures, its collectives and the efficiency."""
    rows, baseline = [], None
    for n in a.gpus:
        for mode in (["single"] if n == 1 else a.modes):
            sets = base_sets + [f"train.steps={a.steps}", f"train.profile_steps={a.profile_steps}",
                                *layout(mode, n)]
            run_dir = tmp / f"{mode}_{n}"
            label = f"{mode} x{n}"
            lines = run_train(train_command(a.config, sets, n, run_dir), label, a.timeout)
            compute = next((ln for ln in lines if ln.startswith("compute:")), "compute: ?")
            fig = summarise(run_dir, a.skip, compute, 0.0)
            drop_checkpoints(run_dir)
            row = {"mode": mode, "gpus": n, "step_s": fig["step_s"], "tokens_per_s": fig["tokens_per_s"],
                   "tokens_per_s_per_gpu": fig["tokens_per_s"] / n}
            for key in ("mfu", "peak_mem_gib"):
                if key in fig:
                    row[key] = fig[key]
            comm = collectives(run_dir / "profile", n)
            for key, ms in comm.items():
                row[key] = ms
                row[key.replace("_ms", "_share")] = ms / 1e3 / fig["step_s"]
            if n == 1:
                baseline = row["tokens_per_s_per_gpu"]
            if baseline:
                row["efficiency"] = row["tokens_per_s_per_gpu"] / baseline
            rows.append(row)
    return rows


def check_rows(a, base_sets: list[str], tmp: Path) -> list[dict]:
    """The correctness checks at the largest N (module docstring): one row per comparison."""
    from vpmoe.train.config import load_run_config

    n, k = max(a.gpus), a.check_steps
    if n < 2:
        raise SystemExit("scaling: --check needs a --gpus entry of 2 or more")
    accum = load_run_config(a.config, base_sets).train.grad_accum
    half, fewer = k // 2, max(1, n // 2)
    common = base_sets + [f"train.steps={k}", "train.profile_steps=0"]
    ref_dir = tmp / "check_one"
    run_train(train_command(a.config, common + [f"train.grad_accum={accum * n}", *layout("single", 1)], 1,
                            ref_dir), "check: 1 rank", a.timeout)
    ref, rows = losses(ref_dir), []
    drop_checkpoints(ref_dir)
    for mode in a.modes:
        full_dir, resumed_dir = tmp / f"check_{mode}_{n}", tmp / f"check_{mode}_{n}_to_{fewer}"
        sets = common + [f"checkpoint.every={half}", "checkpoint.keep=100"]
        run_train(train_command(a.config, sets + layout(mode, n), n, full_dir),
                  f"check: {mode} x{n}", a.timeout)
        full = losses(full_dir)
        worst = worst_difference(full, ref, range(1, k + 1))
        rows.append({"check": f"{mode}: {n} ranks vs 1 rank x{n} micro-batches", "steps": f"1-{k}",
                     "worst_rel_diff": worst, "tol": a.tol, "result": "pass" if worst <= a.tol else "FAIL"})
        resumable_copy(full_dir, resumed_dir, half)
        resume_sets = sets + [f"train.grad_accum={accum * n // fewer}", *layout(mode, fewer)]
        run_train(train_command(a.config, resume_sets, fewer, resumed_dir, resume=True),
                  f"check: {mode} x{n} -> x{fewer}", a.timeout)
        worst = worst_difference(losses(resumed_dir), full, range(half + 1, k + 1))
        drop_checkpoints(full_dir)
        drop_checkpoints(resumed_dir)
        rows.append({"check": f"{mode}: step-{half} checkpoint of {n} ranks resumed on {fewer}",
                     "steps": f"{half + 1}-{k}", "worst_rel_diff": worst, "tol": a.tol,
                     "result": "pass" if worst <= a.tol else "FAIL"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/stage1.toml"))
    ap.add_argument("--data", required=True, help="a dataset made by `vpmoe data build` (seq_len of the config)")
    ap.add_argument("--gpus", default="1,2,4,8", help="process counts, comma-separated (1 is the baseline)")
    ap.add_argument("--modes", default="fsdp,ep", help="fsdp, ep, replicate: comma-separated")
    ap.add_argument("--steps", type=int, default=14, help="steps per run (a GPU profiles after its first 10)")
    ap.add_argument("--skip", type=int, default=3, help="steps left out of the steady state")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled for the collectives' time (0: none)")
    ap.add_argument("--set", action="append", default=[], help="config overrides for every run, KEY=VALUE")
    ap.add_argument("--check", action="store_true", help="also the correctness checks at the largest N")
    ap.add_argument("--check-steps", type=int, default=4)
    ap.add_argument("--tol", type=float, default=2e-2, help="relative loss tolerance of the checks (bf16: 2e-2)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    a = ap.parse_args(argv)
    a.gpus = sorted({int(g) for g in a.gpus.split(",")})
    a.modes = [m for m in a.modes.split(",") if m]
    if not a.gpus or a.gpus[0] < 1 or any(m not in MODES for m in a.modes) or not a.modes:
        raise SystemExit(f"scaling: --gpus wants positive counts and --modes some of {', '.join(MODES)}; "
                         f"got {a.gpus} {a.modes}")

    from vpmoe.config import ConfigError
    from vpmoe.train.config import load_run_config
    base_sets = [f"data.path={json.dumps(str(Path(a.data).resolve()))}", "train.eval_every=0",
                 "checkpoint.every=0", "checkpoint.keep=1"] + a.set
    try:  # a bad override fails here, naming the key, before any run starts
        cfg = load_run_config(a.config, base_sets)
    except ConfigError as e:
        raise SystemExit(f"scaling: {e}") from None
    from bench.results import report
    command = "python3 bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = (f"{cfg.model.n_layers} layers, {cfg.data.micro_batch_size} rows x {cfg.train.grad_accum} "
             f"micro-batches of {cfg.data.seq_len} tokens per GPU; overrides: {' '.join(base_sets[1:])}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        tables = [("scaling", scaling_rows(a, base_sets, Path(tmp)))]
        if a.check:
            checks = check_rows(a, base_sets, Path(tmp))
            failed = any(r["result"] != "pass" for r in checks)
            tables.append(("scaling check", checks))
    for name, rows in tables:
        report(name, rows, a.record, notes=notes, command=command)
    effs = [r["efficiency"] for r in tables[0][1] if r["gpus"] > 1 and "efficiency" in r]
    if effs:
        print(f"weak-scaling efficiency: {statistics.median(effs):.1%} median over {len(effs)} point(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

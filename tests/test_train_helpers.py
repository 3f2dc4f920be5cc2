"""Shared pieces of the training tests: tiny datasets built by `vpmoe data build`, a tiny run
config, `vpmoe train` subprocesses (plain and torchrun) and run-directory snapshots.

The synthetic SYNTH-schema parquet (short additions, 110-170-token conversations) makes steps cheap
on CPU while still going through the real renderer, packer, manifest and loader.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SYNTH_SAMPLE = SHARED / "data" / "synth_sample" / "synth_train.parquet"

TEST_MODEL = """
[model]
vocab_size = 201088
d_model = 32
n_layers = 4
n_heads = 2
n_kv_heads = 1
head_dim = 16
window = 16
n_dense_layers = 1
dense_ffn = 32
n_experts = 8
expert_ffn = 16
shared_ffn = 16
top_k = 2
n_groups = 2
topk_groups = 2
max_seq_len = 192
"""

TEST_RUN = """
[data]
path = "{data}"
seq_len = 192
micro_batch_size = 2

[optim]
lr = 0.02
adamw_lr = 0.01

[schedule]
warmup_steps = 2
decay_fraction = 0.5

[train]
run_dir = "{run_dir}"
steps = {steps}
grad_accum = 2
device = "cpu"
eval_every = 2
eval_rows = 8
progress = false
tensorboard = false

[checkpoint]
every = 2
keep = 3
"""


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)  # the same thread count for every run: bitwise-repeatable CPU math
    e["PYTHONWARNINGS"] = "ignore"
    return e


def vpmoe(*args: str, ranks: int = 0, check: bool = True, timeout: int = 600,
          threads: int = 1) -> subprocess.CompletedProcess:
    """Run `vpmoe ARGS` in a subprocess; ranks > 0 runs it under torchrun with that many ranks."""
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(29500 + os.getpid() % 2000), "-m", "vpmoe.cli", *args]
    else:
        cmd = [sys.executable, "-m", "vpmoe.cli", *args]
    proc = run_reaped(cmd, timeout, cwd=ROOT, env=env(threads))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def proc_stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), or None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc: no procps needed)."""
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if (f := proc_stat(d.name)) and int(f[1]) == pid]


def stop_tree(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop `proc` and the processes it started. torchrun starts each worker in a session of its own,
    so a SIGKILL to torchrun (what `subprocess.run` sends on a timeout) leaves the workers running;
    a SIGTERM makes torchrun stop them first. Whatever is left after `grace` seconds is killed."""
    import signal

    tree, frontier = [], [proc.pid]
    while frontier:  # the descendants, recorded before any of them loses its parent
        frontier = [c for pid in frontier for c in children(pid)]
        tree += [(c, f[19]) for c in frontier if (f := proc_stat(c))]  # with its start time: pids get reused
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, started in tree:
        if (f := proc_stat(pid)) and f[19] == started:  # still the process recorded, not a newcomer on its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_reaped(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` whose timeout stops the whole process
    tree (`stop_tree`) and raises AssertionError with the output's tails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} timed out after {timeout} s\n{out[-3000:]}\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def write_synthetic_parquet(path: Path, rows: int = 240) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    table = []
    for i in range(rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        steps = " ".join(f"Check {a} + {b} again." for _ in range(rng.randint(0, 4)))  # varied span lengths
        answer = f"{a + b}" + (f" since {a} + {b} = {a + b}" if rng.random() < 0.5 else "")
        table.append({"row_id": f"syn-{i:05d}", "query": f"What is {a} plus {b}?",
                      "synthetic_reasoning": f"{a} + {b} = {a + b}. {steps}".strip(), "synthetic_answer": answer})
    pq.write_table(pa.Table.from_pylist(table), path)
    return path


def build_tiny_teacher_cache(data: Path, out: Path, top_k: int = 16) -> Path:
    """A teacher cache for `data`, scored by `vpmoe teacher score` with a tiny random Qwen3
    (o200k vocabulary, peaky head) saved beside it; returns the cache directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=201088, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out / "teacher")
    toml = out / "teacher.toml"
    toml.write_text(f'[teacher]\nbackend = "hf"\nname = "tiny-qwen3"\npath = "{out / "teacher"}"\n'
                    'dtype = "float32"\ndevice = "cpu"\nmax_batch_tokens = 2048\n')
    vpmoe("teacher", "score", "--data", str(data), "--teacher", str(toml), "--out", str(out / "cache"),
          "--top-k", str(top_k), "--quiet", threads=2)
    return out / "cache"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A dataset (seq_len 192, train + valid) built by `vpmoe data build` from synthetic rows."""
    root = tmp_path_factory.mktemp("train_data")
    parquet = write_synthetic_parquet(root / "syn.parquet")
    out = root / "syn192"
    vpmoe("data", "build", "--input", str(parquet), "--out", str(out), "--seq-len", "192",
          "--valid-fraction", "0.1", "--quiet")
    return out


def require_shared() -> Path:
    """The real SYNTH sample; FAIL when absent unless VPMOE_NO_SHARED=1 (then skip)."""
    if SYNTH_SAMPLE.is_file():
        return SYNTH_SAMPLE
    if os.environ.get("VPMOE_NO_SHARED") == "1":
        pytest.skip(f"{SYNTH_SAMPLE} absent and VPMOE_NO_SHARED=1")
    pytest.fail(f"{SYNTH_SAMPLE} is missing: these tests need the shared SYNTH sample beside the repo "
                "(set VPMOE_NO_SHARED=1 to skip them deliberately)")


# the optimizer state stored in fp32 (bf16 is the default): for runs compared with another path at fp32
# rounding, which bf16 state would turn into whole bf16 steps of a moment
FP32_STATE = 'muon_momentum_dtype = "float32"\nadamw_moments_dtype = "float32"'


def write_config(path: Path, data: Path, run_dir: Path, steps: int = 4, extra: str = "", optim: str = "") -> Path:
    """A run config over the test model; `optim`: lines added to its [optim] table, `extra`: tables appended."""
    run = TEST_RUN.format(data=data, run_dir=run_dir, steps=steps).replace("adamw_lr = 0.01\n", f"adamw_lr = 0.01\n{optim}\n")
    path.write_text(TEST_MODEL + run + extra)
    return path


def optimizer_state_dtypes(checkpoint: Path) -> tuple[dict, dict, dict]:
    """(Muon momentum, the embedding's and head's AdamW moments, the other AdamW moments): each
    {checkpoint key: dtype}, read from a DCP checkpoint's metadata (sharded tensors included)."""
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state = {k: m.properties.dtype for k, m in meta.items() if k.startswith("optim.") and hasattr(m, "properties")}
    momentum = {k: d for k, d in state.items() if k.endswith(".momentum")}
    moments = {k: d for k, d in state.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    tables = {k: d for k, d in moments.items() if "embed.weight" in k or "lm_head.weight" in k}
    return momentum, tables, {k: d for k, d in moments.items() if k not in tables}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "grad_norm" in r}


def snapshot(directory: Path) -> dict:
    """Every file under a directory with its size, mtime and sha256: to prove nothing changed."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(directory))] = (st.st_size, st.st_mtime_ns, digest)
        else:
            out[str(p.relative_to(directory))] = "dir"
    return out


def test_helpers_build_a_dataset(synth_data):
    """The fixture itself: a manifest with both splits and supervised tokens of both spans."""
    manifest = json.loads((synth_data / "manifest.json").read_text())
    assert manifest["seq_len"] == 192
    for split in ("train", "valid"):
        counts = manifest["counts"]["splits"][split]
        assert counts["rows"] > 0 and all(v > 0 for v in counts["supervised_tokens"].values())

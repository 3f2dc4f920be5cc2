"""Distributed equivalence on CPU (gloo): `vpmoe train` on 2 ranks with FSDP2 (+ the model's fast
kernels), on 2 ranks with expert parallelism, and on 1 rank through the fused body + fused
optimizer step, gives the same per-step losses, held-out losses, weights and router biases as the
1-rank reference run on the same global batch (1 rank x 2 micro-batches == 2 ranks x 1
micro-batch), and the fused path with activation checkpointing gives its run without it; the
first step's router-bias update equals a hand computation; a 2-rank run resumed from a
checkpoint continues bit-identically; a run resumes on another number of ranks
(1 -> 2, 2 -> 1) and another expert-parallel size (2 -> 1, 1 -> 2) when the global batch is kept,
and is refused with the fix when it is not."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_helpers import (FP32_STATE, metrics, optimizer_state_dtypes, synth_data,  # noqa: F401
                                     train_losses, vpmoe, write_config)

STEPS = 4


def copy_until(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` whose newest checkpoint is `step` (the later ones removed): to resume."""
    shutil.copytree(src, dst)
    for ckpt_dir in (dst / "checkpoints").glob("step_*"):
        if int(ckpt_dir.name.split("_")[1]) > step:
            shutil.rmtree(ckpt_dir)


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("dist")
    # fp32 optimizer state: the runs below are compared at fp32 rounding; bf16 state (the default) has its own runs
    cfg = write_config(root / "run.toml", synth_data, root / "unused", steps=STEPS, optim=FP32_STATE)
    out = {}
    logs = out["logs"] = {}
    logs["one"] = vpmoe("train", str(cfg), "--run-dir", str(root / "one"), "--set", "checkpoint.every=1",
                        "--set", "checkpoint.keep=10")
    out["one"] = root / "one"
    # FSDP2 with the model's fast kernels inside its modules (what `fast_path = "auto"` picks on GPUs)
    vpmoe("train", str(cfg), "--run-dir", str(root / "fsdp"), "--set", "train.grad_accum=1",
          "--set", 'train.fast_path="on"', ranks=2)
    out["fsdp"] = root / "fsdp"
    # one device, fused body + fused optimizer step (what `fast_path = "auto"` picks on one GPU)
    vpmoe("train", str(cfg), "--run-dir", str(root / "fused"), "--set", 'train.fast_path="on"')
    out["fused"] = root / "fused"
    # the same with activation checkpointing: FastBody recomputes each block in backward
    logs["fused_ac"] = vpmoe("train", str(cfg), "--run-dir", str(root / "fused_ac"), "--set", 'train.fast_path="on"',
                             "--set", "train.activation_checkpointing=true")
    out["fused_ac"] = root / "fused_ac"
    # replicas: the fused one-device step on each of 2 ranks, gradients all-reduced
    logs["replicate"] = vpmoe("train", str(cfg), "--run-dir", str(root / "replicate"), "--set", "train.grad_accum=1",
                              "--set", 'train.fast_path="on"', "--set", 'parallel.data_parallel="replicate"', ranks=2)
    out["replicate"] = root / "replicate"
    logs["ep"] = vpmoe("train", str(cfg), "--run-dir", str(root / "ep"), "--set", "train.grad_accum=1",
                       "--set", "parallel.expert_parallel=2", ranks=2)
    out["ep"] = root / "ep"
    # distributed resume: the EP run again from its step-2 checkpoint (FSDP2 + EP DTensor state)
    copy_until(root / "ep", root / "ep_resumed", STEPS - 1)
    vpmoe("train", str(cfg), "--run-dir", str(root / "ep_resumed"), "--set", "train.grad_accum=1",
          "--set", "parallel.expert_parallel=2", "--resume", ranks=2)
    out["ep_resumed"] = root / "ep_resumed"
    # resume on another world size, keeping the global batch: the 1-rank run from its step-2
    # checkpoint on 2 ranks (FSDP2), and the 2-rank FSDP2 run from its step-2 checkpoint on 1 rank
    copy_until(root / "one", root / "one_to_two", 2)
    vpmoe("train", str(cfg), "--run-dir", str(root / "one_to_two"), "--set", "train.grad_accum=1",
          "--set", "checkpoint.every=1", "--set", "checkpoint.keep=10", "--resume", ranks=2)
    out["one_to_two"] = root / "one_to_two"
    copy_until(root / "fsdp", root / "two_to_one", STEPS - 1)
    vpmoe("train", str(cfg), "--run-dir", str(root / "two_to_one"), "--resume")
    out["two_to_one"] = root / "two_to_one"
    # resume with another expert-parallel size: the EP=2 run from step 2 on 1 rank (experts whole),
    # and the 1-rank run from step 2 on 2 ranks with EP=2 (DCP reshards the expert DTensors)
    copy_until(root / "ep", root / "ep_to_one", STEPS - 1)
    vpmoe("train", str(cfg), "--run-dir", str(root / "ep_to_one"), "--resume")
    out["ep_to_one"] = root / "ep_to_one"
    copy_until(root / "one", root / "one_to_ep", 2)
    vpmoe("train", str(cfg), "--run-dir", str(root / "one_to_ep"), "--set", "train.grad_accum=1",
          "--set", "parallel.expert_parallel=2", "--resume", ranks=2)
    out["one_to_ep"] = root / "one_to_ep"
    # the 1-rank run's step-2 checkpoint continued by 2 replicas (DCP fills whole tensors on each)
    copy_until(root / "one", root / "one_to_replicate", 2)
    vpmoe("train", str(cfg), "--run-dir", str(root / "one_to_replicate"), "--set", "train.grad_accum=1",
          "--set", 'train.fast_path="on"', "--set", 'parallel.data_parallel="replicate"', "--resume", ranks=2)
    out["one_to_replicate"] = root / "one_to_replicate"
    # the default bf16 optimizer state: 1 rank, 2 ranks with expert parallelism (DTensor state in bf16), and
    # that run resumed on 1 rank from step 3 (DCP reshards bf16 state)
    cfg16 = write_config(root / "run16.toml", synth_data, root / "unused", steps=STEPS)
    vpmoe("train", str(cfg16), "--run-dir", str(root / "one16"))
    vpmoe("train", str(cfg16), "--run-dir", str(root / "ep16"), "--set", "train.grad_accum=1", "--set",
          "checkpoint.every=1", "--set", "checkpoint.keep=10", "--set", "parallel.expert_parallel=2", ranks=2)
    copy_until(root / "ep16", root / "ep16_to_one", STEPS - 1)
    vpmoe("train", str(cfg16), "--run-dir", str(root / "ep16_to_one"), "--resume")
    out.update(one16=root / "one16", ep16=root / "ep16", ep16_to_one=root / "ep16_to_one")
    out["cfg"] = cfg
    return out


def test_runs_say_how_they_compute(runs):
    """Each run's first line says how it computes (device, precision, path, graphs and why not,
    checkpointing, processes, the MFU denominator), once, from the main rank."""
    want = {"one": "compute: cpu, fp32, module path, no CUDA graphs (the device is not CUDA), 1 process(es)",
            "fused_ac": "compute: cpu, fp32, fused body + fused optimizer, no CUDA graphs (the device is not "
                        "CUDA), activation checkpointing, 1 process(es)",
            "ep": "compute: cpu, fp32, module path, no CUDA graphs (the device is not CUDA; more than one process "
                  "(FSDP2/EP run their own hooks)), 2 process(es), expert parallel 2",
            "replicate": "compute: cpu, fp32, fused body + fused optimizer, no CUDA graphs (the device is not CUDA), "
                         "2 process(es), data parallel by replicas (gradients all-reduced)"}
    for name, line in want.items():
        proc = runs["logs"][name]
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("compute:")]
        assert len(lines) == 1 and lines[0].startswith(line + ", MFU against "), (name, lines)
        assert re.fullmatch(r".*, MFU against \d+\.\d+ TFLOP/s per device \(matmul rate measured here\)", lines[0])


@pytest.mark.parametrize("name", ["one_to_two", "two_to_one", "ep_to_one", "one_to_ep", "one_to_replicate"])
def test_resume_on_another_world_size(runs, name):
    """1 -> 2 and 2 -> 1 ranks, and expert parallelism 2 -> none and none -> 2, from a step-2
    checkpoint (same global batch): DCP reshards weights and optimizer state (expert tensors
    included), the loader continues at its global position; steps 3-4 and the final weights
    match the 1-rank reference as closely as a 2-rank run from the start does."""
    ref, got = train_losses(runs["one"]), train_losses(runs[name])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), f"{name} step {step}"
    assert got[3] != got[2]  # the resumed steps trained on new rows
    a, b = final_state(runs["one"]), final_state(runs[name])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")


def test_bf16_state_two_ranks_and_resume_track_one_rank(runs):
    """The default bf16 optimizer state on 2 ranks with expert parallelism, and that run resumed on 1 rank:
    the checkpoint holds the Muon momentum and the tables' moments in bf16 (DTensor shards included);
    step 1 (before any update) matches the 1-rank bf16 run at fp32 rounding, and each later step's loss
    is at least as close to it as the 1-rank run with fp32 state is: two paths' fp32 rounding
    differences can round a moment to the other bf16 neighbour, which is a subset of what storing it in
    bf16 at all does; the final weights, tensor by tensor, too (measured: at most 0.02 of the fp32-state
    run's distance)."""
    momentum, tables, _ = optimizer_state_dtypes(max((runs["ep16"] / "checkpoints").glob("step_*")))
    assert momentum and set(momentum.values()) == {torch.bfloat16}, momentum
    assert len(tables) == 4 and set(tables.values()) == {torch.bfloat16}, tables
    one16, one32 = train_losses(runs["one16"]), train_losses(runs["one"])
    for name in ("ep16", "ep16_to_one"):
        got = train_losses(runs[name])
        assert sorted(got) == sorted(one16) == list(range(1, STEPS + 1))
        assert got[1] == pytest.approx(one16[1], rel=1e-6, abs=0), name
        for step in range(2, STEPS + 1):
            print(name, step, abs(got[step] - one16[step]), abs(one32[step] - one16[step]))
            assert abs(got[step] - one16[step]) <= abs(one32[step] - one16[step]) + 1e-6 * abs(one16[step]), \
                (name, step)
        # the final weights likewise, tensor by tensor (the router biases move by whole integer-load steps)
        a, b, c = final_state(runs["one16"]), final_state(runs[name]), final_state(runs["one"])
        for key in a:
            if not key.endswith("expert_bias"):
                gap, storage = float((b[key] - a[key]).norm()), float((c[key] - a[key]).norm())
                assert gap <= storage + 1e-6 * float(a[key].norm()), (name, key, gap, storage)
    assert one16[STEPS] < one16[1] - 0.5  # it trained


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    """The 2-rank checkpoint (2 ranks x 2 rows) on 1 rank with grad_accum 1 (2 rows): refused
    before anything is written, naming the grad_accum that keeps the global batch."""
    from tests.test_train_helpers import snapshot

    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    before = snapshot(run)
    proc = vpmoe("train", str(runs["cfg"]), "--run-dir", str(run), "--set", "train.grad_accum=1", "--resume",
                 check=False)
    assert proc.returncode != 0
    assert "global batch of 4 rows per step (2 ranks)" in proc.stderr and "set train.grad_accum = 2" in proc.stderr
    assert snapshot(run) == before


def test_two_rank_resume_is_bit_identical(runs):
    assert train_losses(runs["ep_resumed"]) == train_losses(runs["ep"])
    a, b = final_state(runs["ep"]), final_state(runs["ep_resumed"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_path_with_activation_checkpointing_is_the_same_run(runs):
    """train.activation_checkpointing on the fused path (FastBody recomputing its blocks): the
    same per-step losses and final weights as the fused run without it (fp32, deterministic)."""
    a, b = train_losses(runs["fused"]), train_losses(runs["fused_ac"])
    assert len(a) == STEPS and a == b
    x, y = final_state(runs["fused"]), final_state(runs["fused_ac"])
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=1e-6, atol=1e-8, msg=key)


def test_init_from_hf_export_on_two_ranks(runs, tmp_path):
    """train.init_from an HF export (the 1-rank run's final weights) on 2 FSDP2 ranks: every rank
    reads the full HF weights and keeps its shards (set_model_state_dict over the model built on
    meta), giving the same first steps as on 1 rank; step 1 starts from the trained weights."""
    hf = tmp_path / "hf"
    vpmoe("export", str(runs["one"]), "--hf", str(hf))
    got = {}
    for name, ranks, accum in (("one", 0, 2), ("two", 2, 1)):
        vpmoe("train", str(runs["cfg"]), "--run-dir", str(tmp_path / name), "--set", f'train.init_from="{hf}"',
              "--set", f"train.grad_accum={accum}", "--set", "train.steps=2", "--set", "train.eval_every=0",
              ranks=ranks)
        got[name] = train_losses(tmp_path / name)
    assert sorted(got["one"]) == [1, 2]
    for step in (1, 2):
        assert got["two"][step] == pytest.approx(got["one"][step], rel=1e-6, abs=0), step
    fresh = train_losses(runs["one"])
    assert got["one"][1] < fresh[1] - 0.5  # the export's trained weights, not a fresh init


def final_state(run_dir):
    from vpmoe.train.checkpoint import load_model_for_eval

    model = load_model_for_eval(run_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["fsdp", "ep", "fused", "replicate"])
def test_two_ranks_and_fast_paths_match_one_rank(runs, mode):
    ref, got = train_losses(runs["one"]), train_losses(runs[mode])
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), f"{mode} step {step}"
    ref_valid = {r["step"]: r["valid/loss"] for r in metrics(runs["one"]) if "valid/loss" in r}
    got_valid = {r["step"]: r["valid/loss"] for r in metrics(runs[mode]) if "valid/loss" in r}
    assert sorted(ref_valid) == sorted(got_valid) == [0, 2, 4]
    for step in ref_valid:
        assert got_valid[step] == pytest.approx(ref_valid[step], rel=1e-6)
    # the loss actually moved, so matching losses are not a trivially constant sequence
    assert ref[STEPS] < ref[1] - 0.5
    a, b = final_state(runs["one"]), final_state(runs[mode])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-6, msg=f"{mode}: {name}")
        if name.endswith("expert_bias"):
            assert torch.equal(b[name], a[name]), name  # sign updates of integer loads: exact
    grad_norms = [(r["grad_norm"], s["grad_norm"]) for r, s in zip(
        [r for r in metrics(runs["one"]) if "grad_norm" in r], [r for r in metrics(runs[mode]) if "grad_norm" in r])]
    # the fused optimizer (torch._fused_adamw_, folded clipping) rounds differently, so from step 2
    # on its weights differ in the last bits and the norm by ~1e-5; step 1's norm is the same
    assert grad_norms[0][1] == pytest.approx(grad_norms[0][0], rel=1e-6)
    for x, y in grad_norms:
        assert y == pytest.approx(x, rel=1e-4 if mode in ("fused", "replicate") else 1e-5)


def test_first_bias_update_matches_hand_computation(runs):
    """Biases after step 1 = rate * sign(mean load - load) of the initial model on the global batch."""
    from vpmoe.data.loader import DataLoader
    from vpmoe.model.model import VpMoE
    from vpmoe.train.checkpoint import load_model_for_eval, read_provenance
    from vpmoe.train.config import RunConfig
    from vpmoe.config import from_dict

    run = runs["one"]
    prov = read_provenance(run / "checkpoints" / "step_000001")
    cfg = from_dict(RunConfig, prov["config"])
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model0 = VpMoE(cfg.model)
    global_rows = cfg.data.micro_batch_size * cfg.train.grad_accum
    batch = next(DataLoader(cfg.data.path, global_rows, seed=cfg.data.shuffle_seed))
    with torch.no_grad():
        load = model0(batch["tokens"], doc_ids=batch["doc_ids"]).expert_load.float()
    # the bias is an fp32 buffer starting at 0: after one update it is exactly fp32(rate) * sign
    expected = cfg.model.bias_update_rate * torch.sign(load.mean(1, keepdim=True) - load)
    step1 = load_model_for_eval(run / "checkpoints" / "step_000001")
    got = torch.stack([m.expert_bias for m in step1.moe_layers()])
    assert (expected != 0).any()
    assert torch.equal(got, expected), (got, expected)
    # and the logged router health of step 1 describes exactly these loads
    rec = next(r for r in metrics(run) if r["step"] == 1 and "grad_norm" in r)
    assert rec["router/dead_experts"] == int((load == 0).sum())


def test_ep_local_experts_grouped_match_the_loop():
    """The EP dispatcher's local experts as grouped GEMMs == the per-expert loop, forward and every
    parameter gradient, with an expert that receives no rows; an empty input takes the loop."""
    from tests.test_model import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.expert_parallel import run_local_experts, run_local_experts_loop

    moe = randomize(VpMoE(small(n_experts=8, expert_ffn=16))).moe_layers()[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, moe.w_up.shape[1], generator=g)
    local = torch.randint(0, 8, (40,), generator=g)
    local[local == 3] = 4  # expert 3 gets nothing
    grads = []
    for fn in (run_local_experts, run_local_experts_loop):
        xi = x.clone().requires_grad_(True)
        moe.zero_grad()
        y = fn(moe, xi, local)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([y.detach(), xi.grad] + [getattr(moe, n).grad.clone() for n in ("w_up", "b_up", "w_down", "b_down")])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][2][3].abs().sum() == 0 and grads[0][2][4].abs().sum() > 0
    empty = run_local_experts(moe, x[:0], local[:0])
    assert empty.shape == (0, x.shape[1])


def test_stop_signal_on_one_rank_stops_every_rank(runs, tmp_path):
    """SIGUSR1 to one of two FSDP2 workers only: both finish the step in flight, agree to stop after
    the same step and write one complete checkpoint there; the 2-rank --resume then matches the
    1-rank reference run like an uninterrupted 2-rank run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_train_helpers import ROOT, children, env, stop_tree
    from vpmoe.train.checkpoint import list_checkpoints, verify_checkpoint

    run_dir = tmp_path / "stopped"
    args = ["train", str(runs["cfg"]), "--run-dir", str(run_dir), "--set", "train.grad_accum=1",
            "--set", "checkpoint.every=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + (os.getpid() + 7) % 2000), "-m", "vpmoe.cli", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and train_losses(run_dir):
                break
            time.sleep(0.02)
        workers = children(proc.pid)
        assert proc.poll() is None and len(workers) == 2, (workers, proc.poll())
        os.kill(max(workers), signal.SIGUSR1)  # one worker only
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            stop_tree(proc)
    assert "SIGUSR1 received: stopped after step" in err and "a stop signal on another rank" in err, err[-3000:]
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert len(steps) == 1 and 1 <= steps[0] < STEPS
    verify_checkpoint(list_checkpoints(run_dir)[0][1])  # complete: every rank's files, sizes, hashes
    vpmoe("train", *args[1:], "--resume", ranks=2)
    ref, got = train_losses(runs["one"]), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), step


def test_stopping_torchrun_stops_its_workers(tmp_path):
    """`stop_tree` (the tests' timeouts and clean-ups of torchrun runs) leaves no worker running:
    torchrun starts each worker in a session of its own, so killing torchrun alone (what
    `subprocess.run`'s timeout does) orphaned them. A timed-out `run_reaped` says so."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_train_helpers import proc_stat, env, run_reaped, stop_tree

    tag = f"{600 + os.getpid() % 300}.{time.time_ns() % 997}"  # this test's workers' sleep, told apart in /proc

    def alive() -> list[int]:
        out = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # a zombie (state Z) has stopped: only its parent's wait is due
            if argv[:2] == [b"sleep", tag.encode()] and (f := proc_stat(d.name)) and f[0] != "Z":
                out.append(int(d.name))
        return out

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + (os.getpid() + 13) % 2000), "--no-python",
           "sh", "-c", f'touch "$0/started_$RANK"; exec sleep {tag}', str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("started_*"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)  # the shells exec into sleep
        assert len(alive()) == 2, alive()  # both workers run
    finally:
        stop_tree(proc)
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(), alive()
    with pytest.raises(AssertionError, match="timed out after 0.5 s"):
        run_reaped(["sleep", tag], timeout=0.5)
    assert not alive()


def _replica_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: all_reduce_grads of fresh random gradients (large tensors, coalesced
    small ones of three dtypes, a 0-D one, bf16 ones), and replicas_agree before and after one rank
    changes one element of one tensor in its last bit."""
    import os

    import torch.distributed as dist

    from vpmoe.train.parallel import DistState, all_reduce_grads, replicas_agree

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = DistState(rank, 2, rank, torch.device("cpu"), None, None)
    g = torch.Generator().manual_seed(100 + rank)
    grads = [torch.randn(1 << 20, generator=g), torch.randn(7, 5, generator=g), torch.randn((), generator=g),
             torch.randn(33, generator=g).double(), torch.randn(1 << 20, generator=g).bfloat16(),
             torch.randn(9, generator=g).bfloat16()]
    mine = [t.clone() for t in grads]
    all_reduce_grads(grads, ds)
    weights = [torch.randn(4, 3, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    agree = replicas_agree(weights, ds)
    if rank == 1:
        weights[2][1, 2] = torch.nextafter(weights[2][1, 2], torch.tensor(10.0))
    torch.save({"mine": mine, "sum": grads, "agree": agree, "after": replicas_agree(weights, ds)},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_replicas_sum_and_agree(tmp_path):
    """`all_reduce_grads`: every rank ends with its gradient + the other's, in each dtype and shape,
    coalesced or not, bf16 ones rounded once from the exact sum; `replicas_agree`: True for equal
    weights, False once one rank's weight moves by one ulp."""
    import os

    import torch.multiprocessing as mp

    mp.spawn(_replica_worker, args=(29500 + (os.getpid() + 23) % 2000, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b, sum0, sum1 in zip(r0["mine"], r1["mine"], r0["sum"], r1["sum"]):
        assert torch.equal(sum0, sum1) and sum0.dtype == a.dtype and sum0.shape == a.shape
        assert not torch.equal(sum0, a)
        want = (a.double() + b.double()).to(a.dtype)  # half precision: the exact sum, rounded once
        if a.dtype == torch.bfloat16:
            assert torch.equal(sum0, want)
        else:
            torch.testing.assert_close(sum0, want, rtol=1e-6, atol=1e-7)
    assert r0["agree"] and r1["agree"] and not r0["after"] and not r1["after"]


def test_replicate_refuses_expert_parallel():
    from vpmoe.config import ConfigError
    from vpmoe.train.parallel import ParallelConfig

    with pytest.raises(ConfigError, match="expert_parallel must be 1"):
        ParallelConfig(expert_parallel=2, data_parallel="replicate").validate()
    with pytest.raises(ConfigError, match="data_parallel: expected one of"):
        ParallelConfig(data_parallel="ddp").validate()

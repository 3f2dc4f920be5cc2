"""Exact resume after SIGKILL, refused resumes that leave the run directory untouched, and a
diverging run that stops with the last good checkpoint kept."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train_helpers import (ROOT, env, metrics, optimizer_state_dtypes, snapshot, synth_data,  # noqa: F401
                                      train_losses, vpmoe, write_config)

STEPS = 8


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):  # noqa: F811
    """An uninterrupted run of STEPS steps (checkpoints every 2)."""
    root = tmp_path_factory.mktemp("resume")
    cfg = write_config(root / "run.toml", synth_data, root / "ref", steps=STEPS)
    vpmoe("train", str(cfg))
    return cfg, root / "ref"


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    cfg, ref_dir = reference
    run_dir = tmp_path / "killed"
    kill_after = random.Random(time.time_ns()).randint(3, STEPS - 2)
    cmd = [sys.executable, "-m", "vpmoe.cli", "train", str(cfg), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
            if done and max(done) >= kill_after:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before step {kill_after}: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    from vpmoe.train.checkpoint import latest_checkpoint

    resumed_from = latest_checkpoint(run_dir)
    assert resumed_from is not None, "no checkpoint completed before the kill"
    result = vpmoe("train", str(cfg), "--run-dir", str(run_dir), "--resume")
    assert f"resumed from {resumed_from}" in result.stdout + result.stderr
    ref, got = train_losses(ref_dir), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == ref[step], f"step {step} (killed after {kill_after}, resumed from {resumed_from.name})"
    steps_logged = [r["step"] for r in metrics(run_dir) if "grad_norm" in r]
    assert steps_logged == sorted(set(steps_logged)), "records of the killed run after the checkpoint were kept"
    ref_valid = [(r["step"], r["valid/loss"]) for r in metrics(ref_dir) if "valid/loss" in r]
    got_valid = [(r["step"], r["valid/loss"]) for r in metrics(run_dir) if "valid/loss" in r]
    assert got_valid == ref_valid
    # the newest `keep` checkpoints remain, and no temporary directory is left behind
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000006", "step_000008"]


@pytest.fixture()
def finished(reference, tmp_path):
    """A private copy of the reference run to damage."""
    import shutil

    cfg, ref_dir = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    return cfg, run_dir


def main(*args: str) -> int:
    """`vpmoe ARGS` in this process (refusals happen before any heavy work)."""
    from vpmoe.cli import main as vpmoe_main

    return vpmoe_main(list(args))


def refused(capsys, cfg, run_dir, *extra) -> str:
    before = snapshot(run_dir)
    capsys.readouterr()
    code = main("train", str(cfg), "--run-dir", str(run_dir), "--resume", "--set", "train.steps=10", *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert snapshot(run_dir) == before, "a refused resume changed the run directory"
    return err


def test_resume_refuses_a_different_model(finished, capsys):
    cfg, run_dir = finished
    err = refused(capsys, cfg, run_dir, "--set", "model.d_model=64", "--set", "model.n_experts=16")
    assert "model config differs" in err and "d_model: 32 != 64" in err and "n_experts: 8 != 16" in err


def test_resume_refuses_a_missing_shard(finished, capsys):
    cfg, run_dir = finished
    shard = run_dir / "checkpoints" / "step_000008" / "__0_0.distcp"
    shard.unlink()
    err = refused(capsys, cfg, run_dir)
    assert str(shard) in err and "missing" in err


def test_resume_refuses_a_corrupt_checkpoint(finished, capsys):
    cfg, run_dir = finished
    shard = run_dir / "checkpoints" / "step_000008" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside the tensor data
    shard.write_bytes(bytes(data))
    err = refused(capsys, cfg, run_dir)
    assert str(shard) in err and "sha256" in err and "corrupt" in err
    with open(shard, "r+b") as f:  # truncated
        f.truncate(len(data) // 3)
    err = refused(capsys, cfg, run_dir)
    assert str(shard) in err and "truncated" in err


def test_resume_refuses_a_corrupt_provenance_or_other_tokenizer(finished, capsys):
    cfg, run_dir = finished
    prov = run_dir / "checkpoints" / "step_000008" / "provenance.json"
    original = prov.read_text()
    data = json.loads(original)
    data["tokenizer_sha"] = "0" * 64
    prov.write_text(json.dumps(data))
    err = refused(capsys, cfg, run_dir)
    assert "tokenizer sha256" in err and str(run_dir / "checkpoints" / "step_000008") in err
    prov.write_text(original[: len(original) // 2])
    err = refused(capsys, cfg, run_dir)
    assert str(prov) in err and "corrupt" in err


def test_fresh_start_in_a_used_run_dir_is_refused(finished, capsys):
    cfg, run_dir = finished
    before = snapshot(run_dir)
    assert main("train", str(cfg), "--run-dir", str(run_dir)) == 2
    assert "--resume" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_divergence_stops_with_last_good_checkpoint(synth_data, tmp_path, capsys):  # noqa: F811
    """An absurd AdamW lr blows the logits up to inf at step 2: the run stops (exit 3) naming the
    quantity, writes no checkpoint for the bad step, and step 1's checkpoint stays verifiable."""
    from vpmoe.train.checkpoint import latest_checkpoint, verify_checkpoint

    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "nan", steps=4)
    code = main("train", str(cfg), "--set", "checkpoint.every=1", "--set", "optim.adamw_lr=1e30",
                "--set", "schedule.warmup_steps=0", "--set", "optim.grad_clip=0.0")
    err = capsys.readouterr().err
    assert code == 3, err
    latest = latest_checkpoint(tmp_path / "nan")
    assert latest is not None and latest.name == "step_000001"
    assert "not finite" in err and f"{latest} is the last good checkpoint" in err
    assert verify_checkpoint(latest)["step"] == 1
    assert not list((tmp_path / "nan" / "checkpoints").glob("*.tmp"))
    # diverging before any checkpoint: said as such (no folder named that does not exist)
    cfg = write_config(tmp_path / "run2.toml", synth_data, tmp_path / "nan2", steps=4)
    code = main("train", str(cfg), "--set", "checkpoint.every=100", "--set", "optim.adamw_lr=1e30",
                "--set", "schedule.warmup_steps=0", "--set", "optim.grad_clip=0.0")
    err = capsys.readouterr().err
    assert code == 3 and "No checkpoint was written before it." in err, err


def test_each_step_is_read_after_the_next_is_queued(synth_data, tmp_path, monkeypatch):  # noqa: F811
    """`vpmoe train` reads a step's figures (the one wait for the GPU) only after the next step is
    queued, except where something needs them first: a checkpoint, an evaluation, the last step.
    Every step is still logged once, in order, with the figures `train_step` itself would give."""
    from vpmoe.train.trainer import Trainer

    events, real_launch, real_finish = [], Trainer.launch_step, Trainer.finish_step

    def launch_step(self, batches):
        launched = real_launch(self, batches)
        events.append(f"L{launched.step}")
        return launched

    def finish_step(self, launched):
        events.append(f"F{launched.step}")
        return real_finish(self, launched)

    monkeypatch.setattr(Trainer, "launch_step", launch_step)
    monkeypatch.setattr(Trainer, "finish_step", finish_step)
    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "order", steps=7)
    assert main("train", str(cfg), "--set", "checkpoint.every=3", "--set", "train.eval_every=5") == 0
    # boundaries: checkpoints after 3 and 6, evaluation after 5, the last step 7
    assert events == ["L1", "L2", "F1", "L3", "F2", "F3", "L4", "L5", "F4", "F5", "L6", "F6", "L7", "F7"]
    train = [r for r in metrics(tmp_path / "order") if "grad_norm" in r]
    assert [r["step"] for r in train] == list(range(1, 8))
    assert all(r["step_time_s"] > 0 and r["tokens_step"] == 4 * 192 for r in train)
    # the same run with every step read at once (checkpoint and evaluation every step): same figures
    events.clear()
    assert main("train", str(cfg), "--run-dir", str(tmp_path / "eager"), "--set", "checkpoint.every=1",
                "--set", "train.eval_every=1") == 0
    assert events == [f"{kind}{s}" for s in range(1, 8) for kind in "LF"]
    eager = [r for r in metrics(tmp_path / "eager") if "grad_norm" in r]
    for a, b in zip(train, eager):
        for key in ("loss", "grad_norm", "lr", "aux_loss", "router/entropy_min"):
            assert a[key] == b[key], (a["step"], key)


def test_out_of_memory_stops_with_advice_and_resumes(synth_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A GPU out-of-memory error in step 3 (raised here by a wrapped launch_step) stops the run with
    exit 4 and one message naming the step, the memory settings and the changes that fit (halved
    micro-batch with the global batch kept, checkpointing, bf16 momentum); step 2's checkpoint is
    intact and `--resume` finishes the run. With every change already made, only more GPUs remain."""
    import dataclasses

    import torch

    from vpmoe.train.checkpoint import latest_checkpoint, verify_checkpoint
    from vpmoe.train.config import load_run_config
    from vpmoe.train.cli import out_of_memory_advice
    from vpmoe.train.trainer import Trainer

    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "oom", steps=4)
    real_step = Trainer.launch_step
    calls = []

    def launch_step(self, batches):
        calls.append(self.step)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_step(self, batches)
    monkeypatch.setattr(Trainer, "launch_step", launch_step)
    code = main("train", str(cfg), "--set", "checkpoint.every=1", "--set", 'optim.muon_momentum_dtype="float32"',
                "--set", 'optim.adamw_moments_dtype="float32"')
    err = capsys.readouterr().err
    assert code == 4, err
    assert "ran out of memory after 2 completed steps (2 rows x 192 tokens per micro-batch, 2 micro-batches" in err
    assert "--set data.micro_batch_size=1 --set train.grad_accum=4 (the same 4 rows per step" in err
    assert "train.activation_checkpointing=true" in err and "optim.muon_momentum_dtype=bfloat16" in err
    assert "optim.adamw_moments_dtype=bfloat16" in err
    assert err.strip().endswith("--resume.") and "Traceback" not in err
    latest = latest_checkpoint(tmp_path / "oom")
    assert latest.name == "step_000002" and verify_checkpoint(latest)["step"] == 2
    assert not list((tmp_path / "oom" / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(Trainer, "launch_step", real_step)
    # the advice taken: the resumed run uses the new settings (bf16 momentum is what gets written)
    assert main("train", str(cfg), "--resume", "--set", "data.micro_batch_size=1", "--set", "train.grad_accum=4",
                "--set", "train.activation_checkpointing=true", "--set", 'optim.muon_momentum_dtype="bfloat16"',
                "--set", 'optim.adamw_moments_dtype="bfloat16"') == 0
    out = capsys.readouterr().out
    assert "optimizer settings changed since the checkpoint: muon.momentum_dtype 'float32' -> 'bfloat16'" in out
    final = latest_checkpoint(tmp_path / "oom")
    assert final.name == "step_000004"
    momentum, tables, other = optimizer_state_dtypes(final)
    assert momentum and set(momentum.values()) == {torch.bfloat16}, momentum
    assert len(tables) == 4 and set(tables.values()) == {torch.bfloat16}, tables
    assert set(other.values()) == {torch.float32}, other

    run = load_run_config(cfg)
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, micro_batch_size=1),
                              train=dataclasses.replace(run.train, activation_checkpointing=True),
                              optim=dataclasses.replace(run.optim, muon_momentum_dtype="bfloat16",
                                                        adamw_moments_dtype="bfloat16"))
    advice = out_of_memory_advice(run, None, 8)
    assert advice.startswith("the GPU ran out of memory while building the model and optimizer (1 rows")
    assert "To fit, try: more GPUs" in advice and "--set" not in advice


@pytest.mark.parametrize("last_step", [False, True])
@pytest.mark.parametrize("fits", ["beside", "released", "never"])
def test_held_out_evaluation_beside_the_captured_step(synth_data, tmp_path, monkeypatch,  # noqa: F811
                                                      last_step, fits):
    """The held-out evaluation of a graphed run (`_evaluate_beside_graphs`). `fits`: beside the
    captured graphs, only once they are released, or never. Before the last step the graphs are
    kept when it fits beside them; otherwise they are released with a note and the evaluation runs
    again (the next step captures them anew), and later evaluations release them straight away.
    After the last step they are released first. The
    figures are always a plain evaluation's; out of memory even released, the error reaches
    `vpmoe train`'s advice. The graphed step is CUDA-only: a stand-in with its `graphs` /
    `release()` here."""
    import torch

    from vpmoe.train.config import load_run_config
    from vpmoe.train.trainer import Trainer

    tr = Trainer(load_run_config(write_config(tmp_path / "run.toml", synth_data, tmp_path / "run", steps=2)))
    want, real, events, printed = tr.evaluate(), tr.evaluate, [], []

    class Captured:
        graphs = ("first", None, "update")

        def release(self):
            events.append("release")
            self.graphs = None

    def evaluate():
        events.append("evaluate")
        if fits == "never" or (fits == "released" and tr.graphed.graphs is not None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real()

    class Progress:
        print = printed.append

    tr.graphed = Captured()
    monkeypatch.setattr(tr, "evaluate", evaluate)
    retried = not last_step and fits != "beside"
    expected = (["release", "evaluate"] if last_step else
                ["evaluate"] if fits == "beside" else ["evaluate", "release", "evaluate"])
    note = [f"step {tr.step}: held-out evaluation out of GPU memory beside the captured step: graphs released "
            "for it and every later one (captured again after each)"]
    if fits == "never":
        with pytest.raises(torch.OutOfMemoryError):
            tr._evaluate_beside_graphs(last_step, Progress())
    else:
        assert tr._evaluate_beside_graphs(last_step, Progress()) == want
    assert events == expected
    assert (tr.graphed.graphs is None) == (last_step or fits != "beside")
    assert printed == (note if retried else [])
    if fits == "released" and not last_step:  # the next step captured them again: a later evaluation
        tr.graphed.graphs, events[:] = ("first", None, "update"), []  # releases them straight away
        assert tr._evaluate_beside_graphs(False, Progress()) == want
        assert events == ["release", "evaluate"] and printed == note


def test_out_of_memory_advice_with_partial_checkpointing(synth_data, tmp_path):  # noqa: F811
    """Blocks partly checkpointed (the one-H200 recipe's 50 of 80): the first advice is four more
    checkpointed blocks (never past all of them), then every block; none of it when every block
    already is."""
    from vpmoe.train.cli import out_of_memory_advice
    from vpmoe.train.config import load_run_config

    cfg_path = write_config(tmp_path / "run.toml", synth_data, tmp_path / "run", steps=2)
    for blocks, advised in ((2, 6), (6, 8)):
        cfg = load_run_config(cfg_path, ["model.n_layers=8", f"train.activation_checkpointing={blocks}"])
        msg = out_of_memory_advice(cfg, 8, 1)
        assert f"activation checkpointing on for the first {blocks} of 8 blocks" in msg
        fixes = msg.split("To fit, try: ")[1].split("; or ")
        assert fixes[0].startswith(f"--set train.activation_checkpointing={advised} (each block checkpointed")
        assert fixes[1].startswith("--set train.activation_checkpointing=true")
    full = out_of_memory_advice(load_run_config(cfg_path, ["train.activation_checkpointing=true"]), 8, 1)
    assert "activation_checkpointing=" not in full


def test_last_checkpoint_is_written_before_the_last_evaluation(synth_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The step's checkpoint comes before its held-out evaluation: a final evaluation that runs out
    of memory (as the one-H200 recipe's did) stops the run with the advice, the weights saved."""
    import torch

    from vpmoe.train.checkpoint import latest_checkpoint, verify_checkpoint
    from vpmoe.train.trainer import Trainer

    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "run", steps=2)
    real = Trainer.evaluate

    def evaluate(self):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(self)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert main("train", str(cfg)) == 4
    assert "ran out of memory after 2 completed steps" in capsys.readouterr().err
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step_000002" and verify_checkpoint(latest)["step"] == 2


def test_export_loads_with_automodel_and_matches_the_checkpoint(reference, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from vpmoe.model.hf import register
    from vpmoe.train.checkpoint import latest_checkpoint, load_model_for_eval

    _, ref_dir = reference
    ckpt = latest_checkpoint(ref_dir)
    out = tmp_path / "hf"
    (tmp_path / "hf.tmp").mkdir()  # a folder of the user's with the name an export might have used
    (tmp_path / "hf.tmp" / "notes.txt").write_text("mine")
    assert main("export", str(ckpt), "--hf", str(out)) == 0
    assert (tmp_path / "hf.tmp" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp"]  # no temporary left behind
    assert out.stat().st_mode & 0o777 == 0o755
    register()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    native = load_model_for_eval(ckpt)
    tokens = torch.randint(0, 200000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = native(tokens).logits
        got = hf(tokens, use_cache=False).logits
    assert torch.equal(got, expected)
    for a, b in zip(native.moe_layers(), hf.model.moe_layers()):  # router biases travel too
        assert torch.equal(a.expert_bias, b.expert_bias) and a.expert_bias.abs().sum() > 0
    assert main("export", str(ckpt), "--hf", str(out)) == 2  # never overwrites an export
    assert "already exists" in capsys.readouterr().err


def test_online_kd_from_the_teacher_itself_has_zero_divergence(reference, tmp_path):
    """init_from an HF export and distil online from that same export: at step 1 student and
    teacher are the same function, so the KD loss (forward KL) is ~0 while plain CE is not; the
    trainer routes every loss through vpmoe.kd.objective."""
    cfg, ref_dir = reference
    hf = tmp_path / "teacher_hf"
    assert main("export", str(ref_dir), "--hf", str(hf)) == 0
    teacher = tmp_path / "teacher.toml"
    teacher.write_text(f'[teacher]\nbackend = "hf"\npath = "{hf}"\ndtype = "float32"\ndevice = "cpu"\n')
    run_dir = tmp_path / "kd"
    code = main("train", str(cfg), "--run-dir", str(run_dir), "--set", "train.steps=2",
                "--set", f'train.init_from="{hf}"', "--set", 'kd.mode="online"',
                "--set", f'kd.teacher="{teacher}"', "--set", "kd.kd_fraction=1.0", "--set", "train.eval_every=2")
    assert code == 0
    step1 = next(r for r in metrics(run_dir) if r["step"] == 1 and "grad_norm" in r)
    assert step1["kd_step"] == 1
    for span in ("reasoning", "final"):
        assert abs(step1[f"kd/{span}"]) < 1e-5 and abs(step1[f"kl/{span}"]) < 1e-5, step1
        assert step1[f"ce/{span}"] > 5.0
    assert abs(step1["loss"]) < 2e-5
    # the student started from the teacher's weights (held-out CE at step 0 = the reference's last)
    ref_last = next(r["valid/loss"] for r in metrics(ref_dir) if r["step"] == STEPS and "valid/loss" in r)
    kd_first = next(r["valid/loss"] for r in metrics(run_dir) if r["step"] == 0 and "valid/loss" in r)
    assert kd_first == pytest.approx(ref_last, rel=1e-6)


def test_second_ctrl_c_stops_at_once():
    """Inside `stop_signals`: the first SIGINT is recorded like SIGTERM (the run stops after its
    step, with a checkpoint), the second raises KeyboardInterrupt; outside, the old handler again."""
    from vpmoe.train.signals import stop_signals

    # as in a terminal: a test runner started in the background inherits SIGINT ignored, which
    # stop_signals deliberately leaves alone
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with stop_signals() as got:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert got == [signal.SIGINT]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's: left ignored
    with stop_signals():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_checkpoints_after_the_step_and_resumes(reference, tmp_path, signum):
    """SIGTERM / SIGUSR1 / Ctrl-C mid-run: the step in flight finishes, a checkpoint is written at that step
    (whatever checkpoint.every says), the process exits 75 naming the step; --resume then gives
    the uninterrupted run's losses bit for bit."""
    cfg, ref_dir = reference
    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "vpmoe.cli", "train", str(cfg), "--run-dir", str(run_dir),
           "--set", "checkpoint.every=100"]
    # SIGINT as in a terminal: a background test runner's children inherit it ignored (kept so by design)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
            if done and max(done) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]
    import re

    from vpmoe.train.checkpoint import list_checkpoints

    stopped = int(re.search(rf"{signal.Signals(signum).name} received: stopped after step (\d+) of {STEPS}", err)[1])
    assert 2 <= stopped < STEPS and [s for s, _ in list_checkpoints(run_dir)] == [stopped]
    vpmoe("train", str(cfg), "--run-dir", str(run_dir), "--set", "checkpoint.every=100", "--resume")
    assert train_losses(run_dir) == train_losses(ref_dir)


def test_trainer_run_bench_reads_the_runs_own_metrics(synth_data, tmp_path):  # noqa: F811
    """bench/trainer_run.py (`vpmoe train` timed through its own metrics.jsonl) on the CPU: it runs
    the real command with its overrides and its table's figures are the run's logged ones."""

    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "unused", steps=4)
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "bench/trainer_run.py", "--config", str(cfg), "--data", str(synth_data),
                           "--steps", "4", "--skip", "1", "--no-recipe", "--set", "train.grad_accum=1", "--record",
                           "--run-dir", str(tmp_path / "run")],
                          cwd=ROOT, env={**env(), "VPMOE_RESULTS": str(results)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compute: cpu, fp32, module path" in proc.stdout
    text = results.read_text()
    header, _, values = [ln for ln in text.splitlines() if ln.startswith("|")][:3]
    row = dict(zip(header.strip("|").split(" | "), values.strip("|").split(" | ")))
    row = {k.strip(): v.strip() for k, v in row.items()}
    assert row["steps"] == "4" and row["steady_steps"] == "3" and row["micro"] == "1"
    logged = {r["step"]: r for r in metrics(tmp_path / "run") if "grad_norm" in r}
    assert sorted(logged) == [1, 2, 3, 4]
    want = sorted(logged[s]["tokens_per_s"] for s in (2, 3, 4))[1]  # the median of the steady steps
    assert float(row["tokens_per_s"]) == pytest.approx(want, rel=1e-3)
    mfu = sorted(logged[s]["mfu"] for s in (2, 3, 4))[1]  # against the rate the run measured (its compute line)
    assert float(row["mfu"]) == pytest.approx(mfu, rel=1e-3) and float(row["peak_tflops"]) > 0
    assert float(row["outside_steps_s"]) > 0
    assert "train.grad_accum=1" in text and "trainer_run" in text

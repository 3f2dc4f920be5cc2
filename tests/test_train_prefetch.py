"""The step prefetcher: same batches in the same order as a synchronous loop, the loader state
after each consumed step, worker errors raised in the caller; and an offline-KD run (targets
decoded on the prefetch thread) that stops at a checkpoint and resumes to the same losses."""
from __future__ import annotations

import threading
import types

import pytest

from vpmoe.train.prefetch import StepPrefetcher


class CountingLoader:
    def __init__(self):
        self.position, self.threads = 0, set()

    def produce(self, step):
        self.threads.add(threading.current_thread().name)
        rows = [self.position, self.position + 1]
        self.position += 2
        if step == 4:
            raise ValueError("cache.kdc: row 9: field ids out of range")
        return [{"rows": rows, "step": step}], {"position": self.position}


def test_prefetcher_order_state_and_errors():
    loader = CountingLoader()
    with StepPrefetcher(loader.produce, 1, 6) as pre:
        for step in (1, 2, 3):
            batches, state, waited = pre.get(step)
            assert batches == [{"rows": [2 * (step - 1), 2 * step - 1], "step": step}]
            assert state == {"position": 2 * step} and waited >= 0
        with pytest.raises(RuntimeError, match="asked for step 5, prepared 4"):
            pre.get(5)
        with pytest.raises(ValueError, match="row 9: field ids"):  # the worker's own exception
            pre.get(4)
    assert loader.threads and all(n.startswith("vpmoe-prefetch") for n in loader.threads)
    pre.close()  # idempotent
    with StepPrefetcher(loader.produce, 3, 3) as empty:  # nothing left to run: nothing prepared
        with pytest.raises(RuntimeError, match="asked for step 3"):
            empty.get(3)


def test_offline_kd_run_resumes_to_the_same_losses(tmp_path):
    """Offline KD through `vpmoe train` (cache rows decoded on the prefetch thread, KD and CE steps
    mixed), 6 steps with checkpoints every 2; a copy of the run with its step-6 checkpoint removed
    resumes from step 4 (saved while the prefetcher had already read step 5) and gives identical
    per-step losses and KD metrics."""
    import shutil

    from tests.test_train_helpers import build_tiny_teacher_cache, metrics, train_losses, vpmoe, write_config
    from tests.test_train_helpers import write_synthetic_parquet

    parquet = write_synthetic_parquet(tmp_path / "syn.parquet", rows=120)
    data = tmp_path / "syn192"
    vpmoe("data", "build", "--input", str(parquet), "--out", str(data), "--seq-len", "192",
          "--valid-fraction", "0.1", "--quiet")
    cache = build_tiny_teacher_cache(data, tmp_path / "kd", top_k=8)
    kd = (f'\n[kd]\nmode = "offline"\ncache = "{cache}"\nkd_fraction = 0.5\n'
          '[kd.loss]\nkind = "fkl"\nce_weight = 0.2\n')
    cfg = write_config(tmp_path / "run.toml", data, tmp_path / "straight", steps=6, extra=kd)
    vpmoe("train", str(cfg), threads=2)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000006")
    out = vpmoe("train", str(cfg), "--run-dir", str(tmp_path / "resumed"), "--resume", threads=2)
    assert "step_000004" in out.stdout + out.stderr
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7)) and resumed == straight
    rows = {r["step"]: r for r in metrics(tmp_path / "straight") if "grad_norm" in r}
    again = {r["step"]: r for r in metrics(tmp_path / "resumed") if "grad_norm" in r}
    assert 0 < sum(r["kd_step"] for r in rows.values()) < 6
    for step, r in rows.items():
        assert r["kd_step"] == again[step]["kd_step"] and r.get("kl/final") == again[step].get("kl/final")
        assert r["data_wait_s"] >= 0


def test_pinning_waits_while_a_graph_is_captured(monkeypatch):
    """The prefetch thread's pins (`pin_outside_capture`) wait for a capture holding CAPTURE_LOCK,
    then pin every tensor of every micro-batch (pin_memory faked: this machine has no CUDA)."""
    import torch

    from vpmoe.model import graphed

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    batches = [{"tokens": torch.randint(0, 9, (2, 5)), "name": "a"}, {"tokens": torch.randint(0, 9, (2, 5))}]
    result = []
    worker = threading.Thread(target=lambda: result.append(graphed.pin_outside_capture(batches)))
    with graphed.CAPTURE_LOCK:  # a capture in progress
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not pinned, "pinned while a graph was being captured"
    worker.join(5)
    assert not worker.is_alive() and len(pinned) == 2
    out = result[0]
    assert out[0]["name"] == "a" and all(torch.equal(o["tokens"], b["tokens"]) for o, b in zip(out, batches))


def test_graphed_step_captures_under_the_lock(monkeypatch):
    """Every capture of `GraphedTrainStep._capture` (first micro-batch, the rest, the update) runs
    with CAPTURE_LOCK held, and the lock is free afterwards (CUDA graph calls faked)."""
    import contextlib

    import torch

    from vpmoe.model import graphed

    held = []

    class FakeGraph:
        def pool(self):
            return "pool"

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, capture_error_mode=None):
        held.append((graphed.CAPTURE_LOCK.locked(), capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    step = graphed.GraphedTrainStep.__new__(graphed.GraphedTrainStep)
    step.params, step.micro = [], 2
    step.body = types.SimpleNamespace(clear_low_grads=lambda: None)
    step._micro_part = step._update_part = lambda: None
    step._capture()
    assert held == [(True, graphed.CAPTURE_MODE)] * 3
    assert not graphed.CAPTURE_LOCK.locked() and len(step.graphs) == 3

"""The MFU pieces: flops per token against a brute-force count, and the measured matmul rate."""
import dataclasses
from pathlib import Path

import pytest
import torch

from vpmoe.config import load_model_config
from vpmoe.model.params import count_params
from vpmoe.train.metrics import flops_per_token, measure_matmul_flops


def test_flops_per_token_equals_a_position_by_position_count():
    """6 x (active parameters without the embedding lookup) + attention: for every layer and every
    position i of a row, QK^T and PV over the keys it sees (i + 1 on global layers, min(i + 1,
    window) on local ones), 4 flops per key per head dimension forward, x3 with the backward."""
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=8)
    for seq in (64, 2048):
        attn = 0
        for layer in range(cfg.n_layers):
            for i in range(seq):
                keys = i + 1 if cfg.is_global(layer) else min(i + 1, cfg.window)
                attn += 3 * 4 * cfg.n_heads * cfg.head_dim * keys
        dense = 6 * (count_params(cfg)["active"] - cfg.vocab_size * cfg.d_model)
        assert abs(flops_per_token(cfg, seq) - (dense + attn / seq)) <= 1e-9 * flops_per_token(cfg, seq)


def test_measured_matmul_rate_leaves_the_run_untouched():
    """The MFU denominator measured at a run's start draws from its own generator: the global RNG
    (which a resumed run must continue bit for bit) is unchanged; the rate is a positive number."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    rate = measure_matmul_flops(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
    assert 1e6 < rate < 1e16, rate


def test_progress_messages_stay_one_line_beside_the_bar():
    """With the progress bar on and output to a file or pipe (rich's width is then 80), a long
    message (the `compute:` line) is printed unwrapped: one line, as logs and
    bench/trainer_run.py read it."""
    import subprocess
    import sys

    line = "compute: " + ", ".join(f"part {i} of a long description" for i in range(12))
    code = ("from vpmoe.train.metrics import Progress\n"
            "p = Progress(4, 0, True, True)\n"
            f"p.print({line!r})\n"
            "p.update(1, 1.0, 10.0)\n"
            "p.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert len(line) > 200 and line in proc.stdout.splitlines(), proc.stdout


def test_progress_without_a_terminal_prints_plain_lines(capsys, monkeypatch):
    """Output to a log file (no terminal): no live bar (it would draw only when stopped) but a plain
    line with step, loss, tokens/s and ETA, at most every `plain_every_s` seconds, and always at
    the last step; the ETA from this process's pace (resumed at step 10: 10 steps in 20 s)."""
    from vpmoe.train import metrics

    clock = iter([0.0, 20.0, 25.0, 100.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    p = metrics.Progress(40, 10, True, True, terminal=False, plain_every_s=30.0)
    assert p.bar is None and p.plain
    p.update(20, 2.5, 1234.0)  # t = 20: the first line
    p.update(21, 2.4, 1300.0)  # t = 25: within 30 s of it, skipped
    p.update(40, 2.0, 1400.0)  # the last step: printed whatever the time
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 20/40  loss 2.5000  1,234 tok/s  ETA 00:00:40",
                     "step 40/40  loss 2.0000  1,400 tok/s  ETA 00:00:00"]


def test_tensorboard_event_holds_every_scalar_of_the_record(tmp_path):
    """MetricsLogger writes one TensorBoard event per record: read back through TensorBoard's own
    reader, every finite number and every per-layer list element is there at its step; strings
    and non-finite values are not."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vpmoe.train.metrics import MetricsLogger

    gen = torch.Generator().manual_seed(0)
    records = {}
    log = MetricsLogger(tmp_path, True)
    for step in (1, 2, 5):
        per_layer = torch.rand(7, generator=gen).tolist()
        rec = {"loss": float(torch.rand(1, generator=gen)) + 1, "rows": 3 * step, "kd_step": 1,
               "router/entropy_per_layer": per_layer, "note": "text", "grad_norm": math.inf}
        log.log(step, rec)
        records[step] = rec
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    want = {"loss", "rows", "kd_step"} | {f"router/entropy_per_layer/{i}" for i in range(7)}
    assert set(acc.Tags()["scalars"]) == want
    for tag in want:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        key, _, i = tag.rpartition("/") if tag.startswith("router/") else (tag, "", "")
        expected = {s: (r[key][int(i)] if i else r[key]) for s, r in records.items()}
        assert sorted(got) == sorted(expected), tag
        for s, value in expected.items():
            assert got[s] == pytest.approx(value, rel=1e-6), (tag, s)

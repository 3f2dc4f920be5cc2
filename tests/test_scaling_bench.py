"""bench/scaling.py on the CPU (gloo, a tiny model): the scaling table from real `vpmoe train` runs
under torchrun (1 and 2 ranks: FSDP2, expert parallel, replicas), the all-to-all time read from the runs'
own profiles, and the correctness checks (2 ranks against 1 rank with twice the micro-batches; a
2-rank checkpoint resumed on 1 rank) passing at fp32 tolerance; the comparison fails on other
losses or a missing step; the figures are recorded with the command."""
from __future__ import annotations

import math

import pytest

from bench import scaling
from tests.test_train_helpers import env, synth_data, write_config  # noqa: F401


@pytest.fixture(scope="module")
def recorded(synth_data, tmp_path_factory, monkeypatch_module):  # noqa: F811
    root = tmp_path_factory.mktemp("scaling")
    cfg = write_config(root / "run.toml", synth_data, root / "unused", steps=3)
    results = root / "RESULTS.md"
    for key, value in env().items():
        monkeypatch_module.setenv(key, value)
    monkeypatch_module.setenv("VPMOE_RESULTS", str(results))
    dropped = []
    real_drop = scaling.drop_checkpoints

    def drop(run_dir):  # every run's checkpoints are deleted once read: the disk holds one run's at a time
        assert (run_dir / "checkpoints").is_dir()
        real_drop(run_dir)
        assert not (run_dir / "checkpoints").exists()
        dropped.append(run_dir.name)
    monkeypatch_module.setattr(scaling, "drop_checkpoints", drop)
    code = scaling.main(["--config", str(cfg), "--data", str(synth_data), "--gpus", "1,2", "--modes", "fsdp,ep,replicate",
                         "--steps", "3", "--skip", "1", "--profile-steps", "1", "--check", "--check-steps", "4",
                         "--tol", "1e-5", "--set", "train.grad_accum=1", "--timeout", "600", "--record"])
    assert sorted(dropped) == sorted(["single_1", "fsdp_2", "ep_2", "replicate_2", "check_one"]
                                     + [f"check_{m}_2{t}" for m in ("fsdp", "ep", "replicate") for t in ("", "_to_1")])
    return code, results.read_text()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _table(text: str, section: str) -> list[dict]:
    body = text.split(f"## {section}: ", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_scaling_rows(recorded):
    code, text = recorded
    assert code == 0
    assert "- command: `python3 bench/scaling.py --config" in text and "2 rows x 1 micro-batches" in text
    rows = {(r["mode"], int(r["gpus"])): r for r in _table(text, "scaling")}
    assert set(rows) == {("single", 1), ("fsdp", 2), ("ep", 2), ("replicate", 2)}
    for (mode, n), r in rows.items():  # the table prints 4 significant digits: 3e-3 covers three roundings
        assert float(r["tokens_per_s"]) > 0 and float(r["mfu"]) > 0
        assert math.isclose(float(r["tokens_per_s_per_gpu"]) * n, float(r["tokens_per_s"]), rel_tol=3e-3)
        assert math.isclose(float(r["efficiency"]), float(r["tokens_per_s_per_gpu"])
                            / float(rows[("single", 1)]["tokens_per_s_per_gpu"]), rel_tol=3e-3)
    # the expert-parallel run moved its tokens by all-to-all; FSDP2 alone did not
    assert float(rows[("ep", 2)]["a2a_ms"]) > 0 and 0 < float(rows[("ep", 2)]["a2a_share"]) < 1
    for mode in ("fsdp", "replicate"):
        assert float(rows[(mode, 2)]["a2a_ms"]) == 0 and float(rows[(mode, 2)]["dp_comm_ms"]) > 0


def test_checks_pass(recorded):
    _, text = recorded
    checks = _table(text, "scaling check")
    assert [c["result"] for c in checks] == ["pass"] * 6
    assert [c["steps"] for c in checks] == ["1-4", "3-4"] * 3
    assert [c["check"].split(":")[0] for c in checks] == ["fsdp", "fsdp", "ep", "ep", "replicate", "replicate"]
    assert all(float(c["worst_rel_diff"]) <= 1e-5 for c in checks)


def test_a_check_can_fail():
    """The comparison itself: another run's losses, or a missing step, fail it."""
    want = {1: 5.0, 2: 4.0, 3: 3.5}
    assert scaling.worst_difference(dict(want), want, range(1, 4)) == 0
    assert scaling.worst_difference({1: 5.0, 2: 4.1, 3: 3.5}, want, range(1, 4)) == pytest.approx(0.025)
    assert scaling.worst_difference({1: 5.0, 2: 4.0}, want, range(1, 4)) == math.inf


def test_bad_arguments_are_refused(synth_data, tmp_path):  # noqa: F811
    cfg = write_config(tmp_path / "run.toml", synth_data, tmp_path / "unused")
    with pytest.raises(SystemExit, match="--modes some of fsdp, ep, replicate"):
        scaling.main(["--config", str(cfg), "--data", str(synth_data), "--modes", "tp"])
    with pytest.raises(SystemExit, match="scaling: .*no_such_key"):
        scaling.main(["--config", str(cfg), "--data", str(synth_data), "--set", "train.no_such_key=1"])


def test_a_run_past_its_time_is_stopped_and_a_failed_one_reported():
    import sys
    import time

    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match="slow ran past 1 s:\nstarted"):
        scaling.run_train([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                          "slow", 1.0)
    assert time.perf_counter() - t0 < 20
    with pytest.raises(SystemExit, match="bad exited 3:\nlast words"):
        scaling.run_train([sys.executable, "-c", "print('last words'); raise SystemExit(3)"], "bad", 60)

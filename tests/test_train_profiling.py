"""`train.profile_steps` (vpmoe/train/profiling.py): the timeline arithmetic against a brute-force
count, the profile window's placement, and a real CPU run that writes the profile without changing
the run's numbers."""
import random

import pytest

from tests.test_train_helpers import TEST_MODEL, TEST_RUN, synth_data, train_losses  # noqa: F401
from vpmoe.config import ConfigError
from vpmoe.train.profiling import profile_window, timeline


def _timeline_by_counting(intervals, min_gap):
    """Busy time and holes from a 1-unit grid: a unit is busy iff some interval covers it."""
    lo, hi = min(s for s, _, _ in intervals), max(e for _, e, _ in intervals)
    busy = [any(s <= t < e for s, e, _ in intervals) for t in range(lo, hi)]
    holes, t = [], 0
    while t < len(busy):
        if busy[t]:
            t += 1
            continue
        u = t
        while u < len(busy) and not busy[u]:
            u += 1
        if u - t > min_gap:
            holes.append((lo + t, lo + u))
        t = u
    return hi - lo, sum(busy), holes


def test_timeline_matches_a_brute_force_count():
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 12)
        intervals = []
        for i in range(n):
            s = rng.randint(0, 300)
            intervals.append((s, s + rng.randint(1, 60), f"k{i}"))
        min_gap = rng.choice([0, 5, 20])
        span, busy, gaps = timeline(intervals, min_gap)
        want_span, want_busy, want_holes = _timeline_by_counting(intervals, min_gap)
        assert (span, busy) == (want_span, want_busy), (trial, intervals)
        assert sorted((g[1], g[2]) for g in gaps) == want_holes, (trial, intervals)
        assert [g[0] for g in gaps] == sorted((b - a for a, b in want_holes), reverse=True)
        for length, start, end, before, after in gaps:
            assert before in {name for s, e, name in intervals if e == start}  # the one ending at the hole
            assert after in {name for s, e, name in intervals if s == end}
    assert timeline([], 20) == (0.0, 0.0, [])


def test_profile_window_skips_the_warm_up_and_fits_the_run():
    assert profile_window(4, 0, 100, 10) == (11, 14)
    assert profile_window(4, 0, 12, 10) == (11, 12)  # the run ends first: fewer steps
    assert profile_window(4, 0, 10, 10) is None  # none left after the warm-up
    assert profile_window(4, 0, 3, 0) == (1, 3)  # no warm-up (the CPU): from the first step
    assert profile_window(4, 30, 100, 10) == (31, 34)  # resumed past the warm-up: the steps it runs
    assert profile_window(4, 5, 100, 10) == (11, 14)  # resumed inside it: still after it
    assert profile_window(4, 100, 100, 0) is None and profile_window(0, 0, 100, 0) is None


def test_negative_profile_steps_is_refused(tmp_path):
    from vpmoe.train.config import load_run_config

    (tmp_path / "run.toml").write_text(TEST_MODEL + TEST_RUN.format(data=tmp_path, run_dir=tmp_path / "r", steps=2))
    with pytest.raises(ConfigError, match="train.profile_steps"):
        load_run_config(tmp_path / "run.toml", ["train.profile_steps=-1"])


def test_a_profiled_run_writes_its_profile_and_trains_the_same(tmp_path, synth_data):  # noqa: F811
    """A 3-step CPU run with profile_steps = 2 profiles steps 1-2 (no warm-up on the CPU): summary and
    kernel table written, host time for each profiled step, busy time within the span; its losses
    equal an unprofiled run's bit for bit."""
    from vpmoe.train.config import load_run_config
    from vpmoe.train.trainer import Trainer

    losses = {}
    for profiled in (False, True):
        run = tmp_path / f"run_{profiled}"
        (tmp_path / "run.toml").write_text(TEST_MODEL + TEST_RUN.format(data=synth_data, run_dir=run, steps=3))
        sets = [f"train.profile_steps={2 if profiled else 0}", "train.eval_every=0", "checkpoint.every=0"]
        Trainer(load_run_config(tmp_path / "run.toml", sets)).run()
        losses[profiled] = train_losses(run)
    assert losses[True] == losses[False] and sorted(losses[True]) == [1, 2, 3]
    assert not (tmp_path / "run_False" / "profile").exists()
    summary = (tmp_path / "run_True" / "profile" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("profiled steps 1-2 (2) on cpu: host ops")
    assert len(summary[1].split(":", 1)[1].split(",")) == 2  # host time of each profiled step
    words = summary[2].split()
    span, busy = float(words[2]), float(words[8])
    assert 0 < busy <= span
    table = (tmp_path / "run_True" / "profile" / "kernels.tsv").read_text().splitlines()
    assert table[0] == "family\tlaunches\ttotal_us\tus_each\tkernel" and len(table) > 5
    assert not list((tmp_path / "run_True" / "profile").glob("*.tmp"))

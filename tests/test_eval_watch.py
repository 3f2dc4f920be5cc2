"""Evaluation throughout a run (`vpmoe eval RUN --every-checkpoint [--watch]`): one report per
checkpoint, identical to evaluating that checkpoint alone; a second pass evaluates nothing, one
with other settings is refused; curves
and TensorBoard scalars per step; a watcher started before the run follows it to its last step."""
import json
import subprocess
import sys
import time

from tests.test_train_helpers import ROOT, env, synth_data, vpmoe, write_config  # noqa: F401


def _eval_args(data):
    return ["--every-checkpoint", "--suite", "ppl", "--data", str(data), "--ppl-max-rows", "6", "--device", "cpu"]


def test_every_checkpoint_reports_match_single_evaluations(synth_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", synth_data, run, steps=4)
    vpmoe("train", str(cfg), "--set", "checkpoint.every=2", "--set", "train.eval_every=0")
    vpmoe("eval", str(run), *_eval_args(synth_data))
    out = run / "eval"
    assert sorted(p.name for p in out.glob("step_*.json")) == ["step_000002.json", "step_000004.json"]
    curves = json.loads((out / "curves.json").read_text())
    assert curves["steps"] == [2, 4] and (out / "curves.png").is_file()
    assert list((run / "tb" / "eval").glob("events.*"))
    # the step-4 report equals an evaluation of that checkpoint on its own (a second code path)
    single = tmp_path / "single.json"
    vpmoe("eval", str(run / "checkpoints" / "step_000004"), "--suite", "ppl", "--data", str(synth_data),
          "--ppl-max-rows", "6", "--device", "cpu", "--out", str(single))
    alone = json.loads(single.read_text())["summary"]
    assert alone and all(curves["metrics"][k][1] == v for k, v in alone.items())
    assert curves["metrics"]["ppl.final.nll"][0] != curves["metrics"]["ppl.final.nll"][1]  # training moved it
    # a second pass finds nothing to do and rewrites no report
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("step_*.json")}
    proc = vpmoe("eval", str(run), *_eval_args(synth_data))
    assert "evaluated now: steps []; reports for steps [2, 4]" in proc.stderr and "checkpoint step" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("step_*.json")} == before
    # other settings into the same folder: refused before anything runs (curves never mix two evaluations)
    args = [a if a != "6" else "5" for a in _eval_args(synth_data)]
    proc = vpmoe("eval", str(run), *args, check=False)
    assert proc.returncode == 2 and "step_000002.json: made with other settings (ppl_max_rows 6 then, 5 now)" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("step_*.json")} == before
    # `vpmoe report` picks the curves up
    vpmoe("report", str(run))
    summary = (run / "report" / "summary.md").read_text()
    nll = curves["metrics"]["ppl.final.nll"]
    assert "## Evaluations" in summary and f"| ppl.final.nll | {nll[0]:.4f} | {nll[1]:.4f} |" in summary


def test_watch_follows_a_run_to_its_last_step(synth_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.toml", synth_data, run, steps=4)
    watcher = subprocess.Popen([sys.executable, "-m", "vpmoe.cli", "eval", str(run), *_eval_args(synth_data),
                                "--watch", "--poll-seconds", "0.5"],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert watcher.poll() is None  # waiting for a run that has not started
        vpmoe("train", str(cfg), "--set", "checkpoint.every=2", "--set", "train.eval_every=0")
        _, err = watcher.communicate(timeout=300)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err[-3000:]
    assert "waiting for checkpoints in" in err and "Ctrl-C ends the watch" in err  # a silent wait looked hung
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == ["step_000002.json", "step_000004.json"]
    assert json.loads((run / "eval" / "curves.json").read_text())["steps"] == [2, 4]

"""`configs/train_tiny.toml` on the real SYNTH sample (shared folder), on the data's vocabulary
subset: the held-out loss of both spans falls, TensorBoard and the JSONL agree, `vpmoe report`
writes PNGs that open and a summary that shows the fall, and the export carries the subset.
Fails when the sample is absent unless VPMOE_NO_SHARED=1."""
from __future__ import annotations

import json
import math
import re

import pytest

from tests.test_train_helpers import ROOT, metrics, require_shared, vpmoe

STEPS = 20


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    sample = require_shared()
    root = tmp_path_factory.mktemp("synth")
    data = root / "data"
    vpmoe("data", "build", "--input", str(sample), "--out", str(data), "--seq-len", "512",
          "--valid-fraction", "0.1", "--quiet")
    run_dir = root / "run"
    # the shipped tiny config, shorter, two rows per step
    vpmoe("train", str(ROOT / "configs" / "train_tiny.toml"), "--run-dir", str(run_dir),
          "--set", f'data.path="{data}"', "--set", f"train.steps={STEPS}", "--set", "train.eval_every=10",
          "--set", "train.eval_rows=16", "--set", "data.micro_batch_size=2", "--set", "train.progress=false",
          "--set", "checkpoint.every=0", threads=2)
    return run_dir


def test_held_out_loss_falls_on_real_synth(synth_run):
    valid = {r["step"]: r for r in metrics(synth_run) if "valid/loss" in r}
    assert sorted(valid) == [0, 10, 20]
    first, last = valid[0], valid[STEPS]
    subset = json.loads((synth_run / "checkpoints" / f"step_{STEPS:06d}" / "vocab_subset.json").read_text())
    assert 1000 < len(subset["ids"]) < 201088
    # at init the model is near uniform over the subset: ~ ln(V) per span, two spans
    assert first["valid/loss"] == pytest.approx(2 * math.log(len(subset["ids"])), abs=0.3)
    assert last["valid/loss"] < first["valid/loss"] - 2.0
    for span in ("reasoning", "final"):
        assert last[f"valid/loss/{span}"] < first[f"valid/loss/{span}"] - 0.5, span
        assert first[f"valid/tokens/{span}"] > 0
    train = [r for r in metrics(synth_run) if "grad_norm" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("tokens_per_s", "mfu", "lr", "aux_loss", "router/entropy_min", "router/dead_experts"):
        assert all(key in r for r in train), key
    assert all(0 < r["router/entropy_min"] <= 1 for r in train)


def test_tensorboard_has_the_same_scalars(synth_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(synth_run / "tb"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    jsonl = {r["step"]: r["loss"] for r in metrics(synth_run) if "grad_norm" in r}
    assert sorted(tb) == sorted(jsonl)
    for step, value in jsonl.items():
        assert tb[step] == pytest.approx(value, rel=1e-6)
    assert len(acc.Scalars("valid/loss")) == 3


def test_export_of_a_subset_run_loads_and_keeps_the_subset(synth_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from vpmoe.data.vocab_subset import VocabSubset
    from vpmoe.model.hf import register

    out = tmp_path / "hf"
    vpmoe("export", str(synth_run), "--hf", str(out))
    subset = VocabSubset.find(out)
    assert subset is not None
    register()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_output_embeddings().weight.shape[0] == len(subset)


def test_report_writes_plots_and_summary(synth_run):
    import matplotlib.image as mpimg

    result = vpmoe("report", str(synth_run))
    out = synth_run / "report"
    assert "summary.md" in result.stdout
    for name in ("loss.png", "lr_gradnorm.png", "throughput.png", "router.png", "expert_load.png",
                 "expert_entropy.png"):
        image = mpimg.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"
    summary = (out / "summary.md").read_text()
    row = re.search(r"\| valid/loss \| ([0-9.]+) \| ([0-9.]+) \|", summary)
    assert row and float(row.group(2)) < float(row.group(1)) - 2.0
    assert "![loss.png](loss.png)" in summary

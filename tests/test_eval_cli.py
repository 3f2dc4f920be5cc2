"""`vpmoe eval` end to end through the real entry point: real CORE items, determinism, baselines, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_eval_fixtures import shared_bundle, tiny_qwen, tiny_vpmoe, toy_bundle, toy_data
from vpmoe.cli import main

REAL_TASKS = {"arc_easy", "arc_challenge", "lambada_openai", "boolq", "commonsense_qa"}
SMALL = ["--format-n", "2", "--format-max-new-tokens", "8", "--numeric-n", "7"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tiny_qwen(tmp_path_factory.mktemp("q") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("d"), n_rows=8)


def run(args, capsys):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_real_core_report(report, per_task):
    core = report["suites"]["core8"]
    assert set(core["tasks"]) == REAL_TASKS
    assert set(core["missing"]) == {"hellaswag", "piqa", "winogrande"} and core["complete"] is False
    baselines = {"arc_easy": 25.0, "arc_challenge": 25.0, "lambada_openai": 0.0, "boolq": 62.0, "commonsense_qa": 20.0}
    shots = {"arc_easy": 10, "arc_challenge": 10, "lambada_openai": 0, "boolq": 10, "commonsense_qa": 10}
    for label, r in core["tasks"].items():
        assert r["n_evaluated"] == per_task and r["num_fewshot"] == shots[label]
        assert r["accuracy"] == r["n_correct"] / per_task
        b = baselines[label] / 100
        assert r["random_baseline"] == baselines[label] and r["centered"] == pytest.approx((r["accuracy"] - b) / (1 - b))
    assert core["mean_centered"] == pytest.approx(sum(r["centered"] for r in core["tasks"].values()) / 5)
    rows = report["reference"]["rows"]
    assert rows["boolq"]["reference_pct"] == 84.3 and rows["boolq"]["ours_pct"] == pytest.approx(100 * core["tasks"]["boolq"]["accuracy"])
    assert rows["piqa"]["ours_pct"] is None  # not in this bundle


def test_real_core_items_on_tiny_hf_model(qwen_dir, tmp_path, capsys):
    bundle = shared_bundle()
    out = tmp_path / "report.json"
    code, stdout, err = run([qwen_dir, "--suite", "core8", "--bundle", bundle, "--max-per-task", 3, "--out", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    check_real_core_report(report, 3)
    assert report["model"]["class"] == "Qwen3ForCausalLM" and report["model"]["tokenizer"]["name"] == "o200k_harmony"
    assert set(report["data"]["bundle"]["files_sha256"]) >= {"core.yaml", "eval_data/reading_comprehension/boolq.jsonl"}
    assert "core8.mean_centered" in stdout
    assert "core8: mean over 5 of 8 tasks; missing: hellaswag, piqa, winogrande" in err  # partial: said
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # named tasks must all run: a typo, or a file the bundle lacks, fails before the model loads
    code, _, err = run([qwen_dir, "--suite", "core8", "--bundle", bundle, "--tasks", "boolq,arc_esy",
                        "--out", tmp_path / "typo.json"], capsys)
    assert code == 2 and "--tasks: arc_esy: not listed in core.yaml" in err and "arc_easy" in err
    assert "loading" not in err and not (tmp_path / "typo.json").exists()
    lacking = tmp_path / "lacking"
    shutil.copytree(bundle, lacking)
    next(lacking.glob("eval_data/**/arc_easy.jsonl")).unlink()
    code, _, err = run([qwen_dir, "--suite", "core8", "--bundle", lacking, "--tasks", "boolq,arc_easy",
                        "--out", tmp_path / "typo.json"], capsys)
    assert code == 2 and "arc_easy: data file eval_data/" in err and "not in the bundle" in err
    # a baseline evaluated with other settings: the deltas come with the differences named
    code, stdout, err = run([qwen_dir, "--suite", "core8", "--bundle", bundle, "--tasks", "boolq,arc_easy",
                             "--max-per-task", 2, "--out", tmp_path / "two.json", "--baseline", out], capsys)
    assert code == 0, err
    differ = json.loads((tmp_path / "two.json").read_text())["baseline"]["options_differ"]
    assert differ == {"tasks": [None, ["boolq", "arc_easy"]], "max_per_task": [3, 2]}
    assert "baseline was evaluated with other settings (tasks None -> ['boolq', 'arc_easy'], max_per_task 3 -> 2)" in err
    assert "vs baseline" in stdout


def test_real_core_items_on_tiny_vpmoe(tmp_path, capsys):
    bundle = shared_bundle()
    model = tiny_vpmoe(tmp_path / "vpmoe")
    out = tmp_path / "report.json"
    code, _, err = run([model, "--suite", "core8", "--bundle", bundle, "--max-per-task", 1, "--out", out], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    check_real_core_report(report, 1)
    assert report["model"]["is_vpmoe"] is True


def test_two_runs_give_identical_json_and_zero_deltas(qwen_dir, data_dir, tmp_path, capsys):
    bundle = toy_bundle(tmp_path / "bundle")
    out = tmp_path / "r.json"
    args = [qwen_dir, "--suite", "all", "--bundle", bundle, "--data", data_dir, "--tasks", "all", "--seed", 7,
            "--out", out, *SMALL]
    assert run(args, capsys)[0] == 0
    first = json.loads(out.read_text())
    shutil.copy(out, tmp_path / "baseline.json")
    code, stdout, err = run(args + ["--baseline", tmp_path / "baseline.json"], capsys)
    assert code == 0, err
    second = json.loads(out.read_text())
    baseline = second.pop("baseline")
    first.pop("timestamps"), second.pop("timestamps")
    assert first == second
    assert set(first["suites"]) == {"core8", "ppl", "format", "numeric", "router"}
    assert first["suites"]["router"]["applicable"] is False  # dense Qwen3
    assert first["suites"]["format"]["source"] == "valid split"
    assert baseline["deltas"] and all(d["delta"] == 0 for d in baseline["deltas"].values())
    assert not baseline["only_in_baseline"] and not baseline["only_in_new"]
    assert "(+0.0000 vs baseline)" in stdout


def test_all_skips_suites_without_inputs(qwen_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VPMOE_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("VPMOE_CACHE_DIR", str(tmp_path / "empty_cache"))
    out = tmp_path / "r.json"
    code, _, err = run([qwen_dir, "--suite", "all", "--out", out, *SMALL], capsys)
    assert code == 0, err
    suites = json.loads(out.read_text())["suites"]
    assert "fetch-bundle" in suites["core8"]["skipped"] and suites["ppl"]["skipped"] == "no --data given"
    assert suites["format"]["source"] == "builtin" and suites["numeric"]["copy"]["n_prompts"] == 7


def test_clear_errors(qwen_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VPMOE_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("VPMOE_CACHE_DIR", str(tmp_path / "empty_cache"))
    out = tmp_path / "r.json"
    # no bundle anywhere
    code, _, err = run([qwen_dir, "--suite", "core8", "--out", out], capsys)
    assert code == 2 and "no CORE eval bundle" in err and "vpmoe eval fetch-bundle" in err
    # a model dir that does not load
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_arch"}')
    code, _, err = run([broken, "--suite", "numeric", "--out", out], capsys)
    assert code == 2 and str(broken) in err and "could not load" in err
    # a dir that is neither an HF model nor a checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run([empty, "--suite", "numeric", "--out", out], capsys)
    assert code == 2 and str(empty) in err
    code, _, err = run([tmp_path / "nope", "--suite", "numeric", "--out", out], capsys)
    assert code == 2 and "does not exist" in err
    # data built with another tokenizer
    other = tmp_path / "other_data"
    shutil.copytree(data_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    theirs = manifest["tokenizer"]["sha256"]
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run([qwen_dir, "--suite", "ppl", "--data", other, "--out", out], capsys)
    assert code == 2 and "0" * 64 in err and theirs in err and "differs" in err
    # ppl needs data; a bad baseline is refused before any work
    code, _, err = run([qwen_dir, "--suite", "ppl", "--out", out], capsys)
    assert code == 2 and "--data" in err
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run([qwen_dir, "--suite", "numeric", "--out", out, "--baseline", tmp_path / "bad.json"], capsys)
    assert code == 2 and "not a vpmoe eval report" in err
    assert not out.exists()


def test_fetch_bundle_command_reports_network_failure(tmp_path, capsys):
    code, _, err = run(["fetch-bundle", "--out", tmp_path / "b", "--url", "http://127.0.0.1:9/eval_bundle.zip"], capsys)
    assert code == 2 and "cannot download" in err and not (tmp_path / "b").exists()


def test_training_checkpoint_evaluates_like_its_export(tmp_path, capsys, monkeypatch):
    """A DCP checkpoint (via vpmoe.train.checkpoint) and the HF export of the same weights: same hash, same numbers."""
    import torch

    from vpmoe.config import load_model_config, to_dict
    from vpmoe.model.hf import to_hf
    from vpmoe.model.model import VpMoE
    from vpmoe.train.checkpoint import save_checkpoint

    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    torch.manual_seed(1)
    model = VpMoE(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "run", 3, model, torch.optim.AdamW(model.parameters()),
                           {"step": 3, "tokens": 0, "elapsed": 0.0}, {}, {"model": to_dict(cfg)}, keep=1)
    to_hf(model).save_pretrained(tmp_path / "export")
    reports = []
    for source in (ckpt, tmp_path / "export"):
        out = tmp_path / f"{source.name}.json"
        code, _, err = run([source, "--suite", "numeric", "--numeric-n", 7, "--out", out], capsys)
        assert code == 0, err
        reports.append(json.loads(out.read_text()))
    assert [r["model"]["kind"] for r in reports] == ["checkpoint", "hf"]
    # the run folder: the report names the checkpoint it resolved to
    code, _, err = run([tmp_path / "run", "--suite", "numeric", "--numeric-n", 7, "--out", tmp_path / "run.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run.json").read_text())["model"]["path"] == str(ckpt)
    assert reports[0]["model"]["weights_sha256"] == reports[1]["model"]["weights_sha256"]
    assert reports[0]["suites"] == reports[1]["suites"]
    # an install without the checkpoint reader says to export first
    import vpmoe.eval.loading as loading
    monkeypatch.setattr(loading, "checkpoint_loader", lambda: None)
    code, _, err = run([ckpt, "--suite", "numeric", "--out", tmp_path / "x.json"], capsys)
    assert code == 2 and f"vpmoe export {ckpt}" in err

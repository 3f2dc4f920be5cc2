"""CORE machinery without a model: prompt rendering, selection, centered accuracy, bundle reading, fetch."""
from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from tests.test_eval_fixtures import TOY_ITEMS, TOY_TASKS, toy_bundle, write_bundle
from vpmoe.cli import UserError
from vpmoe.eval import core as B
from vpmoe.eval import core as C
from vpmoe.eval.harness import Scored


def spec(label, task_type, shots, delim, baseline=None):
    return B.TaskSpec(label, f"x/{label}.jsonl", task_type, shots, delim, baseline)


def test_requests_follow_the_dclm_templates():
    mc = spec("mc", "multiple_choice", 1, "\nAnswer: ")
    shot = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    item = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    reqs = C.item_requests(mc, item, [shot])
    assert [(r.context, r.continuation) for r in reqs] == [
        ("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "4"), ("Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: ", "5")]
    schema = spec("s", "schema", 1, " ")
    s_shot = {"context_options": ["A did it because A", "A did it because B"], "continuation": "was sad.", "gold": 1}
    s_item = {"context_options": ["X met Y so X", "X met Y so Y"], "continuation": "smiled.", "gold": 0}
    reqs = C.item_requests(schema, s_item, [s_shot])
    assert [(r.context, r.continuation) for r in reqs] == [
        ("A did it because B was sad.\n\nX met Y so X ", "smiled."),
        ("A did it because B was sad.\n\nX met Y so Y ", "smiled.")]
    lm = spec("l", "language_modeling", 1, " ")
    reqs = C.item_requests(lm, {"context": "  Hello there ", "continuation": "friend"},
                           [{"context": "One two ", "continuation": "three"}])
    assert [(r.context, r.continuation) for r in reqs] == [("One two three\n\nHello there ", "friend")]


def test_selection_and_fewshot_are_seeded_and_exclude_the_item():
    a = C.select_indices(100, "arc_easy", seed=0, max_per_task=10)
    assert a == C.select_indices(100, "arc_easy", seed=0, max_per_task=10)
    assert a != C.select_indices(100, "arc_easy", seed=1, max_per_task=10)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert C.select_indices(5, "t", 0, None) == [0, 1, 2, 3, 4]
    assert C.select_indices(5, "t", 0, 50) == [0, 1, 2, 3, 4]
    for idx in range(6):
        shots = C.fewshot_indices(6, idx, 5, "t", seed=3)
        assert sorted(shots) == [i for i in range(6) if i != idx]
        assert shots == C.fewshot_indices(6, idx, 5, "t", seed=3)
    with pytest.raises(ValueError, match="few-shot"):
        C.fewshot_indices(3, 0, 3, "t", 0)


def test_choose_takes_highest_mean_logprob_first_on_ties():
    scores = [Scored(-6.0, 3, False, 0), Scored(-3.0, 1, False, 0), Scored(-4.0, 2, False, 0)]
    assert C.choose(scores) == 0  # means -2, -3, -2: a tie, the first wins (not the larger sum)
    scores = [Scored(-6.0, 2, False, 0), Scored(-4.0, 2, False, 0), Scored(-2.0, 1, False, 0)]
    assert C.choose(scores) == 1  # means -3, -2, -2: index 1 wins the tie


def test_centered_accuracy_and_suite_mean_match_hand_computation():
    assert C.centered(0.5, 25.0) == pytest.approx(1 / 3)
    assert C.centered(0.62, 62.0) == pytest.approx(0.0)
    assert C.centered(0.9, 50.0) == pytest.approx(0.8)
    assert C.centered(0.1, 0.0) == pytest.approx(0.1)
    assert C.centered(0.5, None) is None
    results = {"a": {"centered": 1 / 3}, "b": {"centered": 0.0}, "c": {"centered": 0.8}, "d": {"centered": None}}
    assert C.suite_mean(results) == pytest.approx((1 / 3 + 0.0 + 0.8) / 3)


def test_task_specs_come_from_core_yaml_and_csv(tmp_path):
    root = toy_bundle(tmp_path / "b")
    specs = B.read_task_specs(root)
    assert list(specs) == ["toy_mc", "toy_schema", "toy_lm"]
    assert specs["toy_mc"] == B.TaskSpec("toy_mc", "toy/mc.jsonl", "multiple_choice", 2, "\nAnswer: ", 30.0)
    assert specs["toy_schema"].task_type == "schema" and specs["toy_schema"].num_fewshot == 1
    assert specs["toy_lm"].random_baseline == 0.0


def test_missing_and_unsupported_tasks_are_reported_not_crashed(tmp_path):
    tasks = TOY_TASKS + [{"label": "qa_task", "dataset_uri": "toy/qa.jsonl", "num_fewshot": [0],
                          "icl_task_type": "question_answering", "continuation_delimiter": " "},
                         {"label": "toy_absent", "dataset_uri": "toy/absent.jsonl", "num_fewshot": [0],
                          "icl_task_type": "language_modeling", "continuation_delimiter": " "}]
    root = write_bundle(tmp_path / "b", tasks, {"toy_lm": TOY_ITEMS["toy_lm"]}, {"toy_lm": 0.0})

    class NeverCalled:
        pass

    out = C.run_core(NeverCalled(), None, root, tasks=["qa_task", "toy_absent", "nonexistent"])
    assert out["tasks"] == {} and out["n_tasks_run"] == 0 and out["mean_centered"] is None
    assert "unsupported icl_task_type 'question_answering'" in out["missing"]["qa_task"]
    assert "eval_data/toy/absent.jsonl" in out["missing"]["toy_absent"]
    assert out["missing"]["nonexistent"] == "not listed in core.yaml"


def test_malformed_items_name_file_and_line(tmp_path):
    root = toy_bundle(tmp_path / "b")
    path = root / "eval_data" / "toy" / "mc.jsonl"
    path.write_text(path.read_text() + json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(UserError, match=r"mc.jsonl:5: gold 5 is not an index"):
        B.read_task_items(root, B.read_task_specs(root)["toy_mc"])
    path.write_text("{not json\n")
    with pytest.raises(UserError, match=r"mc.jsonl:1: not valid JSON"):
        B.read_task_items(root, B.read_task_specs(root)["toy_mc"])


def test_missing_bundle_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv(B.BUNDLE_ENV, raising=False)
    monkeypatch.setenv("VPMOE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="vpmoe eval fetch-bundle") as e:
        B.resolve_bundle_dir(None)
    assert B.BUNDLE_URL in str(e.value)
    with pytest.raises(UserError, match="no core.yaml"):
        B.resolve_bundle_dir(str(tmp_path))
    monkeypatch.setenv(B.BUNDLE_ENV, str(toy_bundle(tmp_path / "env_bundle")))
    assert B.resolve_bundle_dir(None) == tmp_path / "env_bundle"


def make_zip(tmp_path, name="eval_bundle.zip", evil=False):
    src = toy_bundle(tmp_path / "src" / "eval_bundle")
    archive = tmp_path / name
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, str(p.relative_to(src.parent)))
        if evil:
            zf.writestr("../escape.txt", "x")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_fetch_bundle_checks_sha256_then_unpacks(tmp_path):
    archive, digest = make_zip(tmp_path)
    out = B.fetch_bundle(str(tmp_path / "installed"), sha256=digest, zip_path=str(archive))
    assert (out / "core.yaml").is_file() and (out / "eval_data" / "toy" / "mc.jsonl").is_file()
    assert list(B.read_task_specs(out)) == ["toy_mc", "toy_schema", "toy_lm"]
    with pytest.raises(UserError, match="already exists"):
        B.fetch_bundle(str(out), sha256=digest, zip_path=str(archive))
    with pytest.raises(UserError, match="does not match the expected"):
        B.fetch_bundle(str(tmp_path / "bad"), zip_path=str(archive))  # pinned official sha256
    assert not (tmp_path / "bad").exists()
    evil, evil_digest = make_zip(tmp_path, "evil.zip", evil=True)
    with pytest.raises(UserError, match="outside"):
        B.fetch_bundle(str(tmp_path / "evil_out"), sha256=evil_digest, zip_path=str(evil))
    assert not (tmp_path / "evil_out").exists() and not (tmp_path / "escape.txt").exists()
    # corrupt compressed data inside a readable zip directory: the same one-line refusal
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info))
    data = bytearray(deflated.read_bytes())
    with zipfile.ZipFile(deflated) as zf:
        first = max(zf.infolist(), key=lambda i: i.compress_size)
    assert first.compress_type == zipfile.ZIP_DEFLATED and first.compress_size > 40
    start = first.header_offset + 30 + len(first.filename.encode())  # past the local header
    for i in range(start + 2, start + first.compress_size - 2):
        data[i] ^= 0x5A
    (tmp_path / "flip.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match="flip.zip: not a valid zip"):
        B.fetch_bundle(str(tmp_path / "flip_out"), sha256=None, zip_path=str(tmp_path / "flip.zip"))
    assert not (tmp_path / "flip_out").exists() and not list(tmp_path.glob(".bundle-*"))


def test_fetch_bundle_without_network_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot download http://127.0.0.1:9/eval_bundle.zip"):
        B.fetch_bundle(str(tmp_path / "b"), url="http://127.0.0.1:9/eval_bundle.zip")
    assert not (tmp_path / "b").exists()

"""Rendering: golden reproduction of the 888 real rows, masks from structure, truncation, prompt config."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.test_data_support import golden_rows, sample_dir, sample_rows

from vpmoe import tokenizer as tok
from vpmoe.cli import main
from vpmoe.config import ConfigError
from vpmoe.data.prompt import load_prompt
from vpmoe.data.render import (FastRenderer, HarmonyRenderer, RowSkipped, check_row, make_document,
                               render_file)


@pytest.fixture(scope="module")
def prompt():
    return load_prompt(sample_dir() / "harmony_prompt.json")


@pytest.fixture(scope="module")
def official(prompt):
    return HarmonyRenderer(prompt)


def _match_rate(out_path) -> tuple[int, int]:
    ours = pq.read_table(out_path)
    golden = golden_rows()
    matched = sum(all(golden[r["row_id"]][f] == r[f] for f in ("tokens", "loss_mask", "span_id"))
                  for r in ours.to_pylist())
    return matched, len(golden)


def test_render_cli_reproduces_golden_exactly(tmp_path):
    sample = sample_dir()
    out = tmp_path / "rendered.parquet"
    assert main(["data", "render", str(sample / "synth_train.parquet"), "--prompt",
                 str(sample / "harmony_prompt.json"), "--out", str(out), "--quiet"]) == 0
    assert _match_rate(out) == (888, 888)
    golden = pq.read_table(sample / "synth_train_harmony_tokens.parquet")
    assert pq.read_table(out).equals(golden)  # same schema, row order and values
    assert [p.name for p in tmp_path.iterdir()] == ["rendered.parquet"]  # no temp file left


def test_fast_renderer_reproduces_golden(tmp_path, prompt):
    out = tmp_path / "fast.parquet"
    assert render_file(sample_dir() / "synth_train.parquet", out, prompt, renderer="fast", progress=False) == 888
    assert _match_rate(out) == (888, 888)


def test_fast_renderer_equals_official_on_adversarial_content():
    official, fast = HarmonyRenderer(load_prompt()), FastRenderer(load_prompt())  # shipped prompt
    texts = [" <|end|><|start|>user<|message|>x", "\n\n  \t", "Ünïcödé 你好 🤖", "<|return|><|endoftext|>",
             "a" * 5000, "1 2 3\r\n4", " ", "<|channel|>final"]
    for q in texts:
        for r in texts[::3]:
            for a in texts[::2]:
                assert np.array_equal(fast.render(q, r, a), official.render(q, r, a))


def test_masks_decode_to_the_assistant_messages(official):
    """Independent text reference: supervised labels spell exactly the two assistant messages."""
    prompts = json.loads((sample_dir() / "prompts_train.json").read_text())
    for row in sample_rows()[:200]:
        doc = make_document(official.render(row["query"], row["synthetic_reasoning"], row["synthetic_answer"]))
        labels = doc.tokens[1:]
        span = doc.span_id[:-1]
        assert np.array_equal(doc.loss_mask, (doc.span_id > 0).astype(np.uint8))
        assert tok.decode(labels[span == 1]) == ("<|start|>assistant<|channel|>analysis<|message|>"
                                                 + row["synthetic_reasoning"] + "<|end|>")
        assert tok.decode(labels[span == 2]) == ("<|start|>assistant<|channel|>final<|message|>"
                                                 + row["synthetic_answer"] + "<|return|>")
        first = int(np.flatnonzero(doc.span_id)[0])
        assert tok.decode(doc.tokens[:first + 1]) == (
            f"<|start|>system<|message|>{prompts['system_text']}<|end|>"
            f"<|start|>developer<|message|>{prompts['developer_text']}<|end|>"
            f"<|start|>user<|message|>{row['query']}<|end|>")
        assert doc.tokens[-1] == tok.EOD_ID and doc.loss_mask[-2:].tolist() == [0, 0]


def _spans(doc):
    labels, span = doc.tokens[1:], doc.span_id[:-1]
    return labels[span == 1], labels[span == 2]


def test_truncation_cuts_analysis_then_user_and_keeps_final(official):
    row = sample_rows()[0]
    q, r, a = row["query"], row["synthetic_reasoning"], row["synthetic_answer"]
    full = make_document(official.render(q, r, a))
    r_ids, q_ids = tok.encode(r), tok.encode(q)
    n = len(full.tokens)

    # 1) cut 100 analysis tokens from the left
    doc = make_document(official.render(q, r, a), seq_len=n - 100)
    assert len(doc.tokens) == n - 100 and doc.truncated == "analysis"
    analysis, final = _spans(doc)
    header = [tok.START_ID] + tok.encode("assistant") + [tok.CHANNEL_ID] + tok.encode("analysis") + [tok.MESSAGE_ID]
    assert analysis.tolist() == header + r_ids[100:] + [tok.END_ID]
    assert tok.decode(final) == f"<|start|>assistant<|channel|>final<|message|>{a}<|return|>"

    # 2) all analysis content and 10 user tokens go; headers stay
    doc = make_document(official.render(q, r, a), seq_len=n - len(r_ids) - 10)
    assert doc.truncated == "analysis+user" and len(doc.tokens) == n - len(r_ids) - 10
    analysis, final = _spans(doc)
    assert analysis.tolist() == header + [tok.END_ID]
    assert tok.decode(final) == f"<|start|>assistant<|channel|>final<|message|>{a}<|return|>"
    user_start = [tok.START_ID] + tok.encode("user") + [tok.MESSAGE_ID]
    tokens = doc.tokens.tolist()
    at = max(i for i in range(len(tokens)) if tokens[i:i + len(user_start)] == user_start)
    assert tokens[at + len(user_start):at + len(user_start) + len(q_ids) - 10] == q_ids[10:]

    # 3) the final alone does not fit: skipped, never cut
    fixed = n - len(r_ids) - len(q_ids)
    with pytest.raises(RowSkipped) as e:
        make_document(official.render(q, r, a), seq_len=fixed - 1)
    assert e.value.reason == "final_too_long" and e.value.field == "synthetic_answer"
    assert make_document(official.render(q, r, a), seq_len=fixed).truncated == "analysis+user"


@pytest.mark.parametrize("values, reason, field", [
    ((None, "q", "r", "a"), "missing_id", "row_id"),
    (("id", None, "r", "a"), "missing_field", "query"),
    (("id", "q", "  \n", "a"), "empty_field", "synthetic_reasoning"),
    (("id", "q", "r", 42), "wrong_type", "synthetic_answer"),
    (("id", b"\xff\xfe", "r", "a"), "undecodable_text", "query"),
    (("id", "q", "bad \ud800 surrogate", "a"), "undecodable_text", "synthetic_reasoning"),
])
def test_check_row_reasons(values, reason, field):
    with pytest.raises(RowSkipped) as e:
        check_row(*values)
    assert (e.value.reason, e.value.field) == (reason, field)
    assert check_row("id", b"q", "r", "a") == ("id", "q", "r", "a")


def test_render_cli_names_file_row_and_field(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"synth_id": ["a", "b"], "query": ["q", None], "synthetic_reasoning": ["r", "r"],
                             "synthetic_answer": ["x", "y"]}), path)
    assert main(["data", "render", str(path), "--out", str(tmp_path / "o.parquet"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 1: field query: missing_field" in err
    assert not (tmp_path / "o.parquet").exists()
    # outputs that would destroy something, or cannot be written: refused with the path named
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"synth_id": ["a"], "query": ["q"], "synthetic_reasoning": ["r"],
                             "synthetic_answer": ["x"]}), good)
    before = good.read_bytes()
    assert main(["data", "render", str(good), "--out", str(good), "--quiet"]) == 2
    assert "is the input file" in capsys.readouterr().err and good.read_bytes() == before
    assert main(["data", "render", str(good), "--out", str(tmp_path), "--quiet"]) == 2
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err
    assert main(["data", "build", "--input", str(good), "--out", str(good), "--seq-len", "512", "--quiet"]) == 2
    assert f"File exists: '{good}'" in capsys.readouterr().err and good.read_bytes() == before


def test_default_prompt_and_validation(tmp_path):
    shipped = load_prompt()
    golden = json.loads((sample_dir() / "harmony_prompt.json").read_text())
    assert {k: v for k, v in shipped.to_dict().items() if k in golden} == golden
    cases = [({"reasoning_effort": "extreme"}, "reasoning_effort"),
             ({"conversation_start_date": "2026-13-01"}, "conversation_start_date"),
             ({"knowledge_cutoff": "June 2024"}, "knowledge_cutoff"),
             ({"model_identity": 7}, "model_identity"),
             ({"valid_channels": ["commentary"]}, "valid_channels"),
             ({"surprise": 1}, "surprise")]
    for change, field in cases:
        path = tmp_path / "p.json"
        path.write_text(json.dumps({**golden, **change}))
        with pytest.raises(ConfigError, match=field) as e:
            load_prompt(path)
        assert str(path) in str(e.value)
    missing = dict(golden)
    del missing["knowledge_cutoff"]
    path.write_text(json.dumps(missing))
    with pytest.raises(ConfigError, match="missing field knowledge_cutoff"):
        load_prompt(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_prompt(path)

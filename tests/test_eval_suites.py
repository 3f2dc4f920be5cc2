"""format, numeric, router and ppl suites against scripted models and hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_eval_fixtures import AlwaysHarmonyLM, CopyOracleLM, tiny_qwen, tiny_vpmoe, toy_data
from vpmoe import tokenizer as tk
from vpmoe.eval import format as fmt
from vpmoe.eval import numeric, ppl, router
from vpmoe.eval.loading import load_model, o200k_tokenizer
from vpmoe.eval.ppl import open_heldout


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_model(tiny_qwen(tmp_path_factory.mktemp("q") / "m"))


@pytest.fixture(scope="module")
def vpmoe_model(tmp_path_factory):
    return load_model(tiny_vpmoe(tmp_path_factory.mktemp("v") / "m"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("d"), n_rows=8)


def encode_special(text):
    return tk.get_encoding().encode(text, allowed_special="all")


# --- format ---

def test_check_completion_names_the_failure():
    good = encode_special("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert fmt.check_completion(good) == (None, {"analysis": "think", "final": "4"})
    assert fmt.check_completion(good[:-1])[0] == "no_stop"  # ran out of tokens before <|return|>
    assert fmt.check_completion(good[:-1] + [tk.EOD_ID])[0] == "wrong_stop"
    swapped = encode_special("<|channel|>final<|message|>4<|end|><|start|>assistant<|channel|>analysis<|message|>x<|return|>")
    assert fmt.check_completion(swapped)[0] == "wrong_channels"
    only_final = encode_special("<|channel|>final<|message|>4<|return|>")
    assert fmt.check_completion(only_final)[0] == "wrong_channels"
    empty = encode_special("<|channel|>analysis<|message|> <|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert fmt.check_completion(empty)[0] == "empty_message"
    assert fmt.check_completion(encode_special("<|channel|><|return|>"))[0] == "parse_error"


def test_always_valid_harmony_model_scores_100_percent():
    tok = o200k_tokenizer()
    prompts = fmt.render_prompts(list(fmt.BUILTIN_USER_PROMPTS[:3]))
    assert all(p[-2:] == [tk.START_ID] + tk.encode("assistant") for p in prompts)
    result = fmt.run_format(AlwaysHarmonyLM(), tok, prompts, max_new_tokens=64)
    assert result["valid_rate"] == 1.0 and result["n_valid"] == 3
    assert sum(result["failures"].values()) == 0
    assert result["analysis_tokens"]["mean"] == len(tk.encode(AlwaysHarmonyLM.ANALYSIS))
    assert result["final_tokens"]["mean"] == len(tk.encode(AlwaysHarmonyLM.FINAL))
    assert result["completion_tokens"]["max"] == len(AlwaysHarmonyLM().script)
    # too short a budget truncates every output: 0%, all counted as no_stop
    short = fmt.run_format(AlwaysHarmonyLM(), tok, prompts, max_new_tokens=5)
    assert short["valid_rate"] == 0.0 and short["failures"]["no_stop"] == 3


def test_random_model_format_score_is_a_rate(qwen):
    prompts = fmt.render_prompts(list(fmt.BUILTIN_USER_PROMPTS[:2]))
    result = fmt.run_format(qwen.model, qwen.tokenizer, prompts, max_new_tokens=12)
    assert 0.0 <= result["valid_rate"] <= 1.0
    assert result["n_valid"] + sum(result["failures"].values()) == 2
    assert result["completion_tokens"]["n"] == 2 and 1 <= result["completion_tokens"]["max"] <= 12


@pytest.mark.parametrize("static_cache", [False, True])
def test_vpmoe_prompts_generate_batched_as_one_at_a_time(tmp_path, monkeypatch, static_cache):
    """`greedy_generate_many` decodes a vpMoE's prompts as left-padded batches through
    vpmoe.model.generate (here 2 rows a batch, so 3 calls for 5 prompts; with the fixed-shape
    cache too, as on a GPU): the tokens equal transformers' generate one prompt at a time, in
    float64, with rows cut at their stops and at the model's context the same way."""
    from vpmoe.eval import harness
    from vpmoe.model import generate as G

    model = load_model(tiny_vpmoe(tmp_path / "m")).model.double()
    prompts = [[int(t) for t in torch.randint(0, 201088, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (7, 3, 12, 5, 9)]  # the 12-token prompt + 10 new tokens wrap the 16-token window
    monkeypatch.setattr(harness, "GENERATE_ROWS", 2)
    monkeypatch.setattr(G, "CAPTURED_DECODE_ON", ("cpu",) if static_cache else ())
    calls = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))

    def one_at_a_time(stops):
        return [harness.greedy_generate(model, p, 10, stops) for p in prompts]

    free = one_at_a_time([201087])
    assert all(len(r) == 10 for r in free)
    stops = [free[0][3], free[2][1]]  # tokens two rows emit: their rows stop there
    ref = one_at_a_time(stops)
    assert harness.greedy_generate_many(model, prompts, 10, stops) == ref
    assert calls == [2, 2, 1] and min(len(r) for r in ref) < 10
    # the context limit: the 12-token prompt may add 3 tokens, the 9-token one 6, the rest 10
    monkeypatch.setattr(harness, "model_max_length", lambda m: 15)
    ref = one_at_a_time(stops)
    assert [len(r) for r in ref][2] <= 3 and harness.greedy_generate_many(model, prompts, 10, stops) == ref


def test_format_not_applicable_without_o200k():
    tok = o200k_tokenizer()
    tok.o200k_compatible, tok.name = False, "hf:OtherTokenizer"
    result = fmt.run_format(AlwaysHarmonyLM(), tok, [[1, 2]])
    assert result["applicable"] is False and "hf:OtherTokenizer" in result["reason"]


# --- numeric ---

def test_number_tokenisation_counts_match_o200k_digit_grouping():
    counts = numeric.tokenization_counts(o200k_tokenizer())
    by_text = {r["text"]: r for r in counts["strings"]}
    # o200k splits digit runs into groups of at most three, and punctuation apart
    assert by_text["1234567"]["pieces"] == ["123", "456", "7"]
    assert by_text["12345678901234567890"]["n_tokens"] == 7
    assert by_text["3.14159"]["pieces"] == ["3", ".", "141", "59"]
    assert by_text["1,234,567"]["n_tokens"] == 5
    assert by_text["7"]["n_tokens"] == 1
    assert counts["total_tokens"] == sum(r["n_tokens"] for r in counts["strings"])


def test_copy_oracle_scores_100_percent_and_random_model_is_a_rate(qwen):
    tok = o200k_tokenizer()
    perfect = numeric.copy_accuracy(CopyOracleLM(), tok, n=14, seed=3)
    assert perfect["exact_rate"] == 1.0 and perfect["token_accuracy"] == 1.0
    assert all(row["exact_rate"] == 1.0 and row["n"] == 2 for row in perfect["by_kind"].values())
    assert perfect["mean_logprob_per_token"] == pytest.approx(0.0, abs=1e-6)
    rand = numeric.copy_accuracy(qwen.model, qwen.tokenizer, n=7, seed=3)
    assert 0.0 <= rand["exact_rate"] <= 1.0 and 0.0 <= rand["token_accuracy"] <= 1.0
    assert rand["mean_logprob_per_token"] < 0
    assert numeric.copy_requests(7, 3) == numeric.copy_requests(7, 3)
    assert numeric.copy_requests(7, 3) != numeric.copy_requests(7, 4)


# --- router ---

def test_router_metrics_match_hand_computation():
    load = torch.tensor([[4, 4, 0, 0], [2, 2, 2, 2], [8, 0, 0, 0]])
    s = router.summarize_load(load)
    first, even, single = s["layers"]
    assert first["dead_experts"] == [2, 3] and first["entropy_norm"] == pytest.approx(math.log(2) / math.log(4))
    assert first["max_over_mean"] == pytest.approx(2.0) and first["cv"] == pytest.approx(1.0)
    assert even["entropy_norm"] == pytest.approx(1.0) and even["cv"] == pytest.approx(0.0)
    assert single["entropy_norm"] == pytest.approx(0.0) and single["max_over_mean"] == pytest.approx(4.0)
    assert s["dead_experts_total"] == 5 and s["dead_expert_share"] == pytest.approx(5 / 12)
    assert s["mean_entropy_norm"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_router_on_vpmoe_counts_every_token_top_k_times(vpmoe_model, qwen):
    docs = [tk.encode("hello world, this is a test"), tk.encode("another short document 123")]
    result = router.run_router(vpmoe_model.model, docs)
    cfg = vpmoe_model.model.config
    assert result["applicable"] and result["n_moe_layers"] == cfg.n_layers - cfg.n_dense_layers
    n_tokens = sum(len(d) for d in docs)
    assert all(l["tokens_routed"] == n_tokens * cfg.num_experts_per_tok for l in result["layers"])
    assert 0.0 <= result["mean_entropy_norm"] <= 1.0
    dense = router.run_router(qwen.model, docs)
    assert dense["applicable"] is False and "no routers" in dense["reason"]


# --- ppl ---

def hand_span_nll(model, heldout):
    """Independent reference: each document alone through model(...).logits, CE by hand."""
    sums, counts = {1: 0.0, 2: 0.0}, {1: 0, 2: 0}
    for batch in heldout.batches():
        tokens, mask, span, docs = (batch[k][0] for k in ("tokens", "loss_mask", "span_id", "doc_ids"))
        for d in docs.unique().tolist():
            pos = (docs == d).nonzero().flatten()
            lo, hi = int(pos[0]), int(pos[-1]) + 1
            with torch.no_grad():
                logits = model(input_ids=tokens[None, lo:hi], use_cache=False).logits[0].float()
            logp = F.log_softmax(logits[:-1], -1).gather(-1, tokens[lo + 1:hi, None]).squeeze(-1)
            for t in range(hi - lo - 1):
                s = int(span[lo + t])
                if mask[lo + t] and s in sums:
                    sums[s] -= float(logp[t])
                    counts[s] += 1
    return {s: sums[s] / counts[s] for s in sums}, counts


@pytest.mark.parametrize("which", ["qwen3", "vpmoe"])
def test_span_nll_matches_per_document_hand_computation(which, qwen, vpmoe_model, data_dir):
    loaded = qwen if which == "qwen3" else vpmoe_model  # vpMoE runs packed rows with doc_ids
    heldout = open_heldout(data_dir)
    heldout.check_tokenizer(loaded.tokenizer)
    result = ppl.evaluate_batches(loaded.model, heldout.batches())
    want, counts = hand_span_nll(loaded.model, heldout)
    manifest = heldout.manifest["counts"]["splits"]["valid"]["supervised_tokens"]
    assert result["spans"]["reasoning"]["tokens"] == counts[1] == manifest["reasoning"]
    assert result["spans"]["final"]["tokens"] == counts[2] == manifest["final"]
    assert result["spans"]["reasoning"]["nll"] == pytest.approx(want[1], abs=1e-4)
    assert result["spans"]["final"]["nll"] == pytest.approx(want[2], abs=1e-4)
    assert result["spans"]["final"]["ppl"] == pytest.approx(math.exp(want[2]), rel=1e-4)
    assert result["cross_document_positions_dropped"] == 0
    assert result["rows"] == heldout.manifest["counts"]["splits"]["valid"]["rows"]


def test_heldout_prompts_end_where_the_assistant_starts(data_dir):
    heldout = open_heldout(data_dir)
    n_docs = heldout.manifest["counts"]["splits"]["valid"]["docs"]
    assert n_docs >= 2
    prompts = heldout.prompts(n_docs + 5)
    assert len(prompts) == n_docs and heldout.prompts(1) == prompts[:1]
    for p in prompts:
        assert p[-2:] == [tk.START_ID] + tk.encode("assistant")
        assert tk.decode(p).count("<|start|>user") == 1

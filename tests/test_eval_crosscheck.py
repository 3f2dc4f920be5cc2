"""Our per-choice log-likelihoods equal lm-evaluation-harness's on the same (context, continuation) pairs.

lm-eval is the independent reference: its `HFLM.loglikelihood` tokenises, batches, pads and
log-softmaxes on its own. It is a required test dependency (pyproject extra `test`); if it is not
installed this test fails rather than skipping, so a green run always includes the cross-check.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_eval_fixtures import TOY_ITEMS, tiny_qwen, tiny_vpmoe, toy_bundle
from vpmoe.eval import core as C
from vpmoe.eval.core import read_task_items, read_task_specs
from vpmoe.eval.loading import load_model, o200k_tokenizer


def lm_eval_or_fail():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.fail("lm-evaluation-harness is not installed: pip install 'lm-eval[hf]>=0.4' (the cross-check is required)")


def greedy_lm_items(model, tokenizer) -> list[dict]:
    """LM items (for a task with an empty delimiter) whose continuation is the model's own greedy
    output, so lm-eval's is_greedy is True for them: decoded greedy tokens that re-encode to the same
    ids after the context."""
    out = []
    for context in ("The capital of France is", "Answer:", "Once upon a time", "1, 2, 3,"):
        ids = tokenizer.encode(context)
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False, eos_token_id=None)[0, len(ids):]
        text = tokenizer.decode(new.tolist())
        if tokenizer.encode(context + text)[len(ids):] == new.tolist() and not text[-1:].isspace():
            out.append({"context": context, "continuation": text})
    return out


def all_requests(bundle, seed):
    """Every (task, item index, option index, request) our run evaluates, rebuilt from the bundle."""
    specs = read_task_specs(bundle)
    rows = []
    for label, spec in specs.items():
        items = read_task_items(bundle, spec)
        for idx in C.select_indices(len(items), label, seed, None):
            shots = [items[j] for j in C.fewshot_indices(len(items), idx, spec.num_fewshot, label, seed)]
            for k, req in enumerate(C.item_requests(spec, items[idx], shots)):
                rows.append((label, idx, k, req))
    return rows


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tiny_qwen(tmp_path_factory.mktemp("qwen") / "model", with_tokenizer=True)


@pytest.mark.parametrize("which", ["qwen3", "vpmoe"])
def test_loglikelihoods_match_lm_eval(which, qwen_dir, tmp_path):
    lm_eval_or_fail()
    from vpmoe.eval.lm_eval_bridge import lm_eval_continuation_lengths, lm_eval_loglikelihood, make_hflm

    model_dir = qwen_dir if which == "qwen3" else tiny_vpmoe(tmp_path / "vp")
    loaded = load_model(model_dir)
    if which == "qwen3":  # ships o200k tokenizer files: AutoTokenizer, recognised as o200k_harmony
        assert loaded.tokenizer.hf is not None and loaded.tokenizer.o200k_compatible
        assert loaded.tokenizer.sha256 == o200k_tokenizer().sha256
    extra = greedy_lm_items(loaded.model, loaded.tokenizer)
    if which == "qwen3":
        assert extra, "no greedy-reproducible LM item found: the is_greedy comparison would be vacuous"
    bundle = toy_bundle(tmp_path / "bundle", extra_lm=extra)
    ours = C.run_core(loaded.model, loaded.tokenizer, bundle, tasks=["all"], seed=5, details=True, batch_tokens=256)
    assert set(ours["tasks"]) == {"toy_mc", "toy_schema", "toy_lm"} | ({"toy_lm_greedy"} if extra else set())
    assert not ours["missing"]

    rows = all_requests(bundle, seed=5)
    pairs = [(r.context, r.continuation) for _, _, _, r in rows]
    hflm = make_hflm(loaded.model, loaded.tokenizer, batch_size=3)
    theirs = lm_eval_loglikelihood(hflm, pairs)
    their_lengths = lm_eval_continuation_lengths(hflm, pairs)

    by_item = {}
    for (label, idx, k, _), (logprob, greedy), n in zip(rows, theirs, their_lengths):
        by_item.setdefault((label, idx), []).append((logprob, greedy, n))
    n_greedy_true = 0
    for label, result in ours["tasks"].items():
        for record in result["items"]:
            ref = by_item[(label, record["idx"])]
            if result["type"] == "language_modeling":
                (logprob, greedy, n), = ref
                assert record["logprob"] == pytest.approx(logprob, abs=1e-4)
                assert record["n_tokens"] == n
                assert record["correct"] == greedy
                n_greedy_true += greedy
            else:
                assert record["logprobs"] == pytest.approx([r[0] for r in ref], abs=1e-4)
                assert record["n_tokens"] == [r[2] for r in ref]
                means = [r[0] / r[2] for r in ref]  # DCLM rule on lm-eval's numbers
                assert record["pred"] == max(range(len(means)), key=lambda i: (means[i], -i))
    assert n_greedy_true == len(extra)
    # the o200k tiktoken path tokenises exactly like the HF files, so it scores the same
    if which == "qwen3":
        again = C.run_core(loaded.model, o200k_tokenizer(), bundle, tasks=["toy_mc"], seed=5, details=True)
        flat_again = [lp for r in again["tasks"]["toy_mc"]["items"] for lp in r["logprobs"]]
        flat_ours = [lp for r in ours["tasks"]["toy_mc"]["items"] for lp in r["logprobs"]]
        assert flat_again == pytest.approx(flat_ours, abs=1e-4)


def test_fewshot_items_are_rendered_into_the_scored_context(qwen_dir, tmp_path):
    """The context lm-eval scored contains the gold answers of the sampled shots (not their distractors)."""
    bundle = toy_bundle(tmp_path / "bundle")
    rows = all_requests(bundle, seed=5)
    mc_context = next(r.context for label, _, _, r in rows if label == "toy_mc")
    item = next(q for q in TOY_ITEMS["toy_mc"] if mc_context.endswith(f"{q['query']}\nAnswer: "))
    shots = [q for q in TOY_ITEMS["toy_mc"] if q is not item and q["query"] in mc_context]
    assert len(shots) == 2
    for shot in shots:
        assert f"{shot['query']}\nAnswer: {shot['choices'][shot['gold']]}\n\n" in mc_context


def test_bridge_runs_an_lm_eval_task_and_agrees_with_our_harness(qwen_dir, tmp_path):
    """lm-eval's own pipeline (task config, dataset, requests, acc metric) over our in-memory model
    gives the accuracy our harness gives for the same requests under lm-eval's `acc` rule (max sum)."""
    lm_eval_or_fail()
    import json as _json

    from vpmoe.eval.harness import Request, score_requests
    from vpmoe.eval.lm_eval_bridge import run_lm_eval_tasks

    rows = [{"question": q["query"].removeprefix("Question: "), "choices": q["choices"], "label": q["gold"]}
            for q in TOY_ITEMS["toy_mc"]]
    rows += [{"question": "Which one is a colour?", "choices": ["seven", "purple", "table"], "label": 1},
             {"question": "Where do fish live?", "choices": ["water", "sand"], "label": 0}]
    (tmp_path / "toy.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    task = {"task": "vpmoe_toy_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "toy.jsonl")}},
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    loaded = load_model(qwen_dir)
    theirs = run_lm_eval_tasks(loaded.model, loaded.tokenizer, [task])["vpmoe_toy_mc"]["acc,none"]
    correct = 0
    for r in rows:
        scores = score_requests(loaded.model, loaded.tokenizer,
                                [Request(f"Question: {r['question']}\nAnswer:", f" {c}") for c in r["choices"]])
        sums = [s.logprob for s in scores]
        correct += int(sums.index(max(sums)) == r["label"])
    assert theirs == pytest.approx(correct / len(rows))

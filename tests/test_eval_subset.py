"""`vpmoe eval` on a model trained on a vocabulary subset: o200k ids in, full-vocabulary logits out.

Reference: a full-vocabulary tiny vpMoE and the same model cut to a subset (embedding and head rows
of the kept ids). On text inside the subset the two compute the same logits for the kept ids, so
the subset model's log-probabilities are the full model's renormalised over the subset.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.test_eval_cli import check_real_core_report
from tests.test_eval_fixtures import shared_bundle
from vpmoe.cli import UserError, main
from vpmoe.config import load_model_config
from vpmoe.data.vocab_subset import FIRST_SPECIAL, VocabSubset
from vpmoe.eval.loading import SubsetCausalLM, load_model
from vpmoe.model.hf import to_hf
from vpmoe.model.model import VpMoE

ROOT = Path(__file__).resolve().parents[1]


def bundle_ids() -> set[int]:
    """Every id the eval bundle's strings encode to, bare and after a space (how choices are joined)."""
    from vpmoe import tokenizer as tk
    strings: list[str] = []

    def walk(v):
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for f in sorted((Path(shared_bundle()) / "eval_data").rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            walk(json.loads(line))
    ids: set[int] = set()
    for text in strings:
        ids.update(tk.encode(text))
        ids.update(tk.encode(" " + text))
    return ids


def full_and_subset(tmp_path: Path, kept_below: int, extra: set[int] = frozenset()) -> tuple[VpMoE, VocabSubset, Path]:
    """A random full-vocab tiny model, and its cut to ids < kept_below, `extra` and the specials, exported."""
    cfg = load_model_config(ROOT / "configs" / "tiny.toml")
    torch.manual_seed(3)
    full = VpMoE(cfg).eval()
    subset = VocabSubset(sorted(set(range(kept_below)) | set(extra)) + list(range(FIRST_SPECIAL, cfg.vocab_size)),
                         cfg.vocab_size)
    cut = VpMoE(dataclasses.replace(cfg, vocab_size=len(subset))).eval()
    state = full.state_dict()
    kept = torch.from_numpy(subset.ids)
    state["embed.weight"] = state["embed.weight"][kept]
    state["lm_head.weight"] = state["lm_head.weight"][kept]
    cut.load_state_dict(state)
    path = tmp_path / "subset_model"
    to_hf(cut).save_pretrained(path)
    subset.save(path)
    return full, subset, path


def test_subset_model_logits_are_the_full_models_renormalised(tmp_path):
    full, subset, path = full_and_subset(tmp_path, kept_below=5000)
    loaded = load_model(path, device="cpu", dtype="float32")
    assert isinstance(loaded.model, SubsetCausalLM)
    assert loaded.info["vocab_subset"] == {"ids": len(subset), "sha256": subset.sha256}
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 5000, (2, 20), generator=g), torch.full((2, 1), 200006)], 1)  # + <|start|>
    with torch.no_grad():
        got = loaded.model(input_ids=ids, use_cache=False).logits
        ref = full(ids).logits
    kept = torch.from_numpy(subset.ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got[..., kept], ref[..., kept], rtol=1e-5, atol=1e-5)
    outside = torch.ones(ref.shape[-1], dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(got[..., outside]).all()
    torch.testing.assert_close(got.log_softmax(-1)[..., kept], ref[..., kept].log_softmax(-1), rtol=1e-5, atol=1e-5)
    # an input id outside the subset has no embedding row: refused, naming the id and the model
    with pytest.raises(UserError, match=f"token id 7000 .*{path.name}|{path.name}.*token id 7000"):
        loaded.model(input_ids=torch.tensor([[1, 7000]]), use_cache=False)
    # the export loaded bare reads compact ids: an o200k id says so (not an index error in the embedding)
    from transformers import AutoModelForCausalLM
    bare = AutoModelForCausalLM.from_pretrained(path).eval()
    compact = subset.to_compact(ids)
    with torch.no_grad():
        torch.testing.assert_close(bare(compact, use_cache=False).logits, got[..., kept], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"input id 200006 >= this model's vocab_size .*to_compact"):
        bare(ids, use_cache=False)


def test_eval_cli_on_a_subset_model(tmp_path, capsys):
    """End to end on real CORE items (one per task) and the router suite: it runs, names the subset,
    and reports finite scores; a subset too small for the items fails naming the first missing id."""
    _, subset, path = full_and_subset(tmp_path, kept_below=100000, extra=bundle_ids())
    out = tmp_path / "report.json"
    code = main(["eval", str(path), "--suite", "core8", "--bundle", str(shared_bundle()), "--max-per-task", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["model"]["vocab_subset"]["ids"] == len(subset)
    check_real_core_report(report, 1)
    code = main(["eval", str(path), "--suite", "router", "--out", str(tmp_path / "router.json")])
    assert code == 0, capsys.readouterr().err
    router = json.loads((tmp_path / "router.json").read_text())["suites"]["router"]
    assert router["documents_skipped_outside_vocab_subset"] >= 0 and router["n_documents"] > 0
    assert router["layers"]

    _, _, small = full_and_subset(tmp_path / "small", kept_below=300)
    code = main(["eval", str(small), "--suite", "core8", "--bundle", str(shared_bundle()), "--max-per-task", "1",
                 "--out", str(tmp_path / "small.json")])
    err = capsys.readouterr().err
    assert code == 2 and "is not in the vocab subset" in err and "vocabulary subset" in err
    assert not (tmp_path / "small.json").exists()
    # under --suite all every suite the subset allows still runs; the others are recorded as skipped
    code = main(["eval", str(small), "--suite", "all", "--bundle", str(shared_bundle()), "--max-per-task", "1",
                 "--numeric-n", "7", "--format-n", "1", "--format-max-new-tokens", "4", "--out", str(tmp_path / "all.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    suites = json.loads((tmp_path / "all.json").read_text())["suites"]
    assert "is not in the vocab subset" in suites["core8"]["skipped"] and "core8 skipped" in err
    assert "outside the model's vocabulary subset" in suites["router"]["reason"]  # it ran, and says why it had no text
    for name in ("format", "numeric"):  # built-in texts far outside a 300-id subset: skipped with the reason
        assert "is not in the vocab subset" in suites[name]["skipped"], name


def test_subset_model_generates_batched_as_its_step_by_step_loop(tmp_path, monkeypatch):
    """A subset-trained vpMoE decodes many prompts through vpmoe.model.generate with the subset (ids
    mapped both ways): the same tokens as the harness's one-prompt full-recompute loop over
    SubsetCausalLM (float64), stops given as o200k ids; a prompt id outside the subset is refused
    by name before anything runs."""
    from vpmoe.eval import harness
    from vpmoe.model import generate as G

    _, subset, path = full_and_subset(tmp_path, kept_below=5000)
    model = load_model(path, device="cpu", dtype="float32").model.double()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 5000, (n,), generator=g).tolist() + [200006] for n in (6, 11, 3)]
    calls = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(k["subset"]) or real(*a, **k))
    free = harness.greedy_generate_many(model, prompts, 6, [200012])  # (the loop is the slow side)
    stops = [free[1][2]]  # an o200k id the second row emits: that row stops there
    ref = [harness.greedy_generate(model, p, 6, stops) for p in prompts]
    assert len(ref[1]) == 3 and harness.greedy_generate_many(model, prompts, 6, stops) == ref
    assert [c.sha256 for c in calls] == [subset.sha256] * 2
    calls.clear()
    with pytest.raises(UserError, match="token id 7000"):
        harness.greedy_generate_many(model, prompts + [[1, 7000]], 6, stops)
    assert calls == []

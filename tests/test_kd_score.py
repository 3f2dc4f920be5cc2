"""End to end on CPU: a tiny random HF teacher (Qwen3, vocab 201088) scores packed rows built by
`vpmoe data build`; verify, read back aligned to loader batches, compare with the teacher's true
distribution (computed independently, one plain forward per document), resume, work split,
refusals (mismatched data/settings, truncated shard), the CLI, and the objective on top."""
import math
import random

import numpy as np
import pytest
import torch

from vpmoe.cli import main as vpmoe_main
from vpmoe.kd.cache import CacheError, CacheSpec, TeacherCache, verify_cache
from vpmoe.kd.losses import LossSpec, span_means
from vpmoe.kd.score import score
from vpmoe.kd.teacher import load_teacher_config, targets_from_logits

V = 201088
K = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vpmoe.data.build import build

    root = tmp_path_factory.mktemp("kd_e2e")
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away to see sun rise over green hills".split()
    rows = [{"synth_id": f"id{i}", "query": " ".join(rng.choices(words, k=6)),
             "synthetic_reasoning": " ".join(rng.choices(words, k=rng.randint(8, 30))),
             "synthetic_answer": " ".join(rng.choices(words, k=rng.randint(3, 10)))} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), root / "synth.parquet")
    build(root / "synth.parquet", root / "data", seq_len=256, valid_fraction=0.0, chunk_rows=4, progress=False)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaky distributions, like a trained LM's
    model.save_pretrained(root / "teacher")
    toml = root / "teacher.toml"
    toml.write_text(f'[teacher]\nbackend = "hf"\nname = "tiny-qwen3"\npath = "{root / "teacher"}"\n'
                    'dtype = "float32"\ndevice = "cpu"\nmax_batch_tokens = 1024\n')
    tcfg = load_teacher_config(toml)
    spec = CacheSpec(top_k=K)
    first = score(root / "data", tcfg, root / "cache", spec, rank=1, world=2, progress=False)
    second = score(root / "data", tcfg, root / "cache", spec, rank=0, world=2, progress=False)
    return {"root": root, "model": model.eval(), "toml": toml, "tcfg": tcfg, "spec": spec,
            "runs": (first, second)}


def test_work_split_and_resume(world):
    first, second = world["runs"]
    n = first["shards_total"]
    assert n >= 2 and first["shards_mine"] + second["shards_mine"] == n
    assert first["positions"] > 0 and second["positions"] > 0
    again = score(world["root"] / "data", world["tcfg"], world["root"] / "cache", world["spec"], rank=0,
                  world=1, progress=False)
    assert again["shards_skipped"] == n and again["positions"] == 0
    report = verify_cache(world["root"] / "cache")
    assert report["positions"] == first["positions"] + second["positions"]


def test_cache_matches_true_teacher_distribution(world):
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.score import data_manifest, data_split_hash, tokenizer_sha

    data = SplitData(world["root"] / "data", "train")
    manifest = data_manifest(world["root"] / "data")
    cache = TeacherCache(world["root"] / "cache", tokenizer_sha(manifest), data_split_hash(manifest, "train"))
    picks = [len(data) - 1, 0, 2]
    batch = data.batch(picks)
    target = cache.batch_target(batch["sample_index"], batch["loss_mask"], tokens=batch["tokens"])
    # the truth, independently: one plain forward per document, full logits
    true_lp = []
    with torch.no_grad():
        for b in range(len(picks)):
            doc_ids, mask = batch["doc_ids"][b], batch["loss_mask"][b].bool()
            for d in torch.unique(doc_ids):
                where = torch.nonzero(doc_ids == d).squeeze(1)
                sup = where[mask[where]]
                if len(sup):
                    logits = world["model"](batch["tokens"][b, where][None]).logits[0].double()
                    true_lp.append(torch.log_softmax(logits, -1)[sup - where[0]])
    true_lp = torch.cat(true_lp)
    assert true_lp.shape[0] == target.ids.shape[0] == int(batch["loss_mask"].sum())
    top = true_lp.topk(K, -1)
    assert torch.equal(torch.sort(top.indices, 1).values, torch.sort(target.ids, 1).values)
    labels = batch["labels"][batch["loss_mask"].bool()]
    torch.testing.assert_close(target.label_logprob.double(), true_lp.gather(1, labels[:, None]).squeeze(1),
                               atol=0.02, rtol=2e-3)
    rest = torch.logsumexp(true_lp.scatter(1, top.indices, -math.inf), -1)
    torch.testing.assert_close(target.rest_logmass.double(), rest.clamp_min(-100), atol=0.02, rtol=2e-3)
    # coarse KL (top-k + rest) between the truth and the decoded cache: quantisation only
    exact = torch.log_softmax(torch.cat([top.values, rest[:, None]], 1), -1)
    order = torch.argsort(torch.argsort(top.indices, 1), 1)  # cache (id-sorted) -> rank order
    cached = torch.cat([target.logprobs.double().gather(1, order), target.rest_logmass.double()[:, None]], 1)
    cached = torch.log_softmax(cached, -1)
    kl = (exact.exp() * (exact - cached)).sum(1).mean().item()
    assert 0 <= kl < 2e-3, kl


def test_hf_backend_rows_equal_plain_forward(world):
    from vpmoe.kd.teacher import HFTeacher

    teacher = HFTeacher(world["tcfg"], top_k=4, tail_samples=3, seed=0)
    g = torch.Generator().manual_seed(1)
    docs = [(torch.randint(0, 1000, (n,), generator=g).numpy(), np.array(p)) for n, p in
            ((17, [0, 5, 15]), (9, [2, 7]), (30, list(range(0, 29, 4))))]
    scores = teacher.score_docs(docs)
    with torch.no_grad():
        for (tokens, positions), s in zip(docs, scores):
            lp = torch.log_softmax(world["model"](torch.as_tensor(tokens)[None]).logits[0].double(), -1)[positions]
            top = lp.topk(4, -1)
            assert np.array_equal(s.ids[:, :4], top.indices.numpy())
            np.testing.assert_allclose(s.logprobs, lp.gather(1, torch.as_tensor(s.ids)).numpy(), atol=1e-4)
            samples = torch.as_tensor(s.ids[:, 4:])
            assert not (samples[:, :, None] == top.indices[:, None, :]).any()  # drawn outside the top-k
            assert all(len(set(row)) == 7 for row in s.ids.tolist())
            outside = lp.scatter(1, torch.as_tensor(s.ids), -math.inf)
            np.testing.assert_allclose(s.rest_logmass, torch.logsumexp(outside, -1).numpy(), atol=1e-4)
            labels = torch.as_tensor(tokens)[positions + 1]
            np.testing.assert_allclose(s.label_logprob, lp.gather(1, labels[:, None]).squeeze(1).numpy(), atol=1e-4)


def test_tail_samples_follow_the_tail_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    ids, lps, _, rest = targets_from_logits(logits, torch.zeros(4000, dtype=torch.long), top_k=2,
                                            tail_samples=1, generator=g)
    freq = torch.bincount(ids[:, 2], minlength=6).double() / 4000
    tail = torch.softmax(logits[0, 2:].double(), 0)
    torch.testing.assert_close(freq[2:], tail, atol=0.03, rtol=0)
    assert freq[:2].sum() == 0


def test_refusals_and_truncation_named(world, tmp_path):
    root = world["root"]
    other = CacheSpec(top_k=K + 1)
    with pytest.raises(CacheError, match="another spec"):
        score(root / "data", world["tcfg"], root / "cache", other, progress=False)
    with pytest.raises(CacheError, match="data manifest.*the data given has bogus"):
        TeacherCache(root / "cache", data_hash="bogus")
    import shutil

    broken = tmp_path / "cache"
    shutil.copytree(root / "cache", broken)
    victim = sorted(broken.glob("*.kdc"))[1]
    victim.write_bytes(victim.read_bytes()[:-3])
    with pytest.raises(CacheError, match=f"{victim.stem}.*truncated"):
        verify_cache(broken)
    assert vpmoe_main(["teacher", "verify", str(broken)]) == 2
    assert vpmoe_main(["teacher", "verify", str(root / "cache"), "--data", str(root / "data")]) == 0


def test_resume_by_another_teacher_is_refused_a_moved_one_is_not(world, tmp_path, capsys, monkeypatch):
    """A cache resumed with another checkpoint under the same teacher name (a second random tiny
    Qwen3, same config) is refused, naming the weights' fingerprint; the same weights in another
    folder resume; a teacher path without a model fails before any manifest is written; an
    interrupted `teacher score` says how to resume instead of a traceback."""
    import dataclasses
    import shutil

    from transformers import Qwen3ForCausalLM

    from vpmoe.kd import score as score_module

    root = world["root"]
    partial = tmp_path / "cache"
    shutil.copytree(root / "cache", partial)
    last = max(partial.glob("*.kdc")).stem
    for f in partial.glob(f"{last}.*"):
        f.unlink()
    torch.manual_seed(1)
    Qwen3ForCausalLM(world["model"].config).save_pretrained(tmp_path / "other")
    other = dataclasses.replace(world["tcfg"], path=str(tmp_path / "other"))
    assert other.teacher_id == world["tcfg"].teacher_id  # the same name
    with pytest.raises(CacheError, match="another teacher.*weights_fingerprint"):
        score(root / "data", other, partial, world["spec"], progress=False)
    shutil.copytree(root / "teacher", tmp_path / "moved")
    moved = dataclasses.replace(world["tcfg"], path=str(tmp_path / "moved"))
    resumed = score(root / "data", moved, partial, world["spec"], progress=False)
    assert resumed["shards_skipped"] == resumed["shards_total"] - 1 and resumed["positions"] > 0
    assert verify_cache(partial)["positions"] == verify_cache(root / "cache")["positions"]
    nowhere = dataclasses.replace(world["tcfg"], path=str(tmp_path / "nope"))
    with pytest.raises(CacheError, match="nope: teacher.path has no config.json"):
        score(root / "data", nowhere, tmp_path / "fresh", world["spec"], progress=False)
    assert not (tmp_path / "fresh" / "manifest.json").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(score_module, "score", interrupted)
    code = vpmoe_main(["teacher", "score", "--data", str(root / "data"), "--teacher", str(world["toml"]),
                       "--out", str(partial), "--top-k", str(K), "--quiet"])
    assert code == 2 and "interrupted" in capsys.readouterr().err


def test_cli_score_resumes(world, capsys):
    root = world["root"]
    code = vpmoe_main(["teacher", "score", "--data", str(root / "data"), "--teacher", str(world["toml"]),
                       "--out", str(root / "cache"), "--top-k", str(K), "--quiet"])
    assert code == 0 and '"shards_skipped"' in capsys.readouterr().out


def test_objective_offline_on_loader_batches(world):
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.objective import KDConfig, KDObjective, is_kd_step
    from vpmoe.config import from_dict

    cfg = from_dict(KDConfig, {"mode": "offline", "cache": str(world["root"] / "cache"),
                               "loss": {"kind": "fkl", "ce_weight": 0.2}, "kd_fraction": 0.6})
    objective = KDObjective(cfg, data_dir=world["root"] / "data")
    batch = SplitData(world["root"] / "data", "train").batch([1, 0])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 256, 8, generator=g, requires_grad=True)
    head = torch.randn(V, 8, generator=g) * 0.1
    loss, stats = objective(hidden, head, batch, step=0, kd=True)
    loss.backward()
    assert stats["kd"].item() == 1 and torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    means = span_means(stats)
    assert means["teacher_logp/final"] < 0 and means["kl/reasoning"] > 0
    ce_loss, ce_stats = objective(hidden, head, batch, step=0, kd=False)
    assert ce_stats["kd"].item() == 0 and "kl/final" not in span_means(ce_stats)
    share = np.mean([is_kd_step(cfg, s) for s in range(4000)])
    assert abs(share - 0.6) < 0.03
    # a cache scored on other data is refused when the objective is built, showing both hashes
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vpmoe.data.build import build

    other = world["root"] / "other"
    pq.write_table(pa.Table.from_pylist([{"synth_id": "x", "query": "q", "synthetic_reasoning": "r r",
                                          "synthetic_answer": "a"}]), world["root"] / "other.parquet")
    build(world["root"] / "other.parquet", other, seq_len=256, valid_fraction=0.0, progress=False)
    with pytest.raises(CacheError, match="another data manifest: cache has data_manifest_hash=.*, the data given"):
        KDObjective(cfg, data_dir=other)


def test_online_teacher_dense_target(world):
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.objective import KDConfig, KDObjective
    from vpmoe.config import from_dict

    cfg = from_dict(KDConfig, {"mode": "online", "teacher": str(world["toml"]), "loss": {"kind": "rkl"}})
    objective = KDObjective(cfg)
    batch = SplitData(world["root"] / "data", "train").batch([0])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 256, 8, generator=g, requires_grad=True)
    head = torch.randn(V, 8, generator=g) * 0.1
    loss, stats = objective(hidden, head, batch, step=0, kd=True)
    # the same loss from the teacher's plain per-document logits (the reference, materialised)
    from vpmoe.kd.losses import DenseTarget, span_loss_reference

    mask = batch["loss_mask"][0].bool()
    rows = []
    with torch.no_grad():
        for d in torch.unique(batch["doc_ids"][0]):
            where = torch.nonzero(batch["doc_ids"][0] == d).squeeze(1)
            sup = where[mask[where]]
            if len(sup):
                rows.append(world["model"](batch["tokens"][0, where][None]).logits[0][sup - where[0]])
    span = torch.where(mask, batch["span_id"][0], 0)
    ref, _ = span_loss_reference(hidden[0].detach(), head, batch["labels"][0], span, LossSpec(kind="rkl"),
                                 DenseTarget(logits=torch.cat(rows)))
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("include_label", [False, True])
def test_objective_staged_target_match_eager(world, include_label):
    """The captured-step form of offline KD (targets staged over all positions, one gated loss for
    KD and CE steps) gives the eager objective's loss, gradients and per-span stats on real cached
    rows, for a KD step and a CE step."""
    from vpmoe.config import from_dict
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.objective import KDConfig, KDObjective
    from vpmoe.train.span_stats import pack_stats

    cfg = from_dict(KDConfig, {"mode": "offline", "cache": str(world["root"] / "cache"), "chunk_size": 128,
                               "include_label": include_label, "loss": {"kind": "jsd", "ce_weight": 0.3}})
    objective = KDObjective(cfg, data_dir=world["root"] / "data")
    batch = SplitData(world["root"] / "data", "train").batch([2, 0, 1])
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 256, 8, generator=g, dtype=torch.float64)
    head = torch.randn(V, 8, generator=g, dtype=torch.float64) * 0.3

    def run(kd, static, staged=None):
        h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
        b = dict(batch, **objective.staged_target(batch, kd)) if (static or staged) else batch
        loss, stats = objective(h, w, b, step=0, kd=kd, w_r=0.6, w_f=1.4, static=static)
        gh, gw = torch.autograd.grad(loss, [h, w])
        return loss.detach(), gh, gw, pack_stats(stats), stats["kd"]

    for kd in (True, False):
        ref = run(kd, static=False)
        for out in (run(kd, static=True), run(kd, static=False, staged=True)):  # captured / eager staged
            for x, y in zip(ref[:4], out[:4]):
                torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)
            assert float(out[4]) == float(ref[4]) == float(kd)
    staged = objective.staged_target(batch, True)
    assert staged["kd_ids"].shape == (3 * 256, K + include_label)
    with pytest.raises(CacheError, match="batch tokens differ"):  # the token check still runs
        objective.staged_target(dict(batch, tokens=batch["tokens"].roll(1, 1)), True)


def test_trainer_graph_batches_and_loss_match_eager(world, tmp_path):
    """The trainer's captured-step glue on the CPU (the graphs themselves need CUDA: tests/gpu):
    `_graph_batches` stages this step's cached targets or a CE dummy, and `_graph_loss` on them
    gives the eager objective's loss, stats and head/hidden gradients on a KD and on a CE step."""
    from tests.test_train_helpers import TEST_MODEL, TEST_RUN
    from vpmoe.data.loader import SplitData
    from vpmoe.kd.objective import is_kd_step
    from vpmoe.kd.losses import count_span_tokens
    from vpmoe.train.config import load_run_config
    from vpmoe.train.span_stats import pack_stats
    from vpmoe.train.trainer import Trainer

    text = (TEST_MODEL.replace("max_seq_len = 192", "max_seq_len = 256")
            + TEST_RUN.format(data=world["root"] / "data", run_dir=tmp_path / "run", steps=2)
            .replace("seq_len = 192", "seq_len = 256")
            + f'\n[kd]\nmode = "offline"\ncache = "{world["root"] / "cache"}"\nkd_fraction = 0.5\n'
              '[kd.loss]\nkind = "fkl"\nce_weight = 0.25\n')
    (tmp_path / "run.toml").write_text(text)
    tr = Trainer(load_run_config(tmp_path / "run.toml"))
    assert tr._graphs_wanted() == (False, "the device is not CUDA")
    device, capability = tr.device, tr.capability
    tr.device, tr.capability = torch.device("cuda"), (9, 0)  # as on an H100: offline KD is graphed
    assert tr._graphs_wanted() == (True, "")
    tr.device, tr.capability = device, capability
    batches = [SplitData(world["root"] / "data", "train").batch(rows) for rows in ([0, 2], [1, 3])]
    counts = sum(count_span_tokens(b["span_id"].long() * b["loss_mask"].long()) for b in batches)
    kd_steps = [is_kd_step(tr.objective.cfg, s) for s in range(20)]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 256, 32, generator=g)
    head = tr.model.lm_head.weight
    for step in (kd_steps.index(True), kd_steps.index(False)):
        tr.step, tr._graph_counts = step, counts
        staged = tr._graph_batches(batches)
        assert all(float(b["kd_gate"]) == kd_steps[step] for b in staged)
        for b, sb in zip(batches, staged):
            h1 = hidden.clone().requires_grad_(True)
            loss, packed = tr._graph_loss(h1, sb, 0.5)
            gh, gw = torch.autograd.grad(loss, [h1, head])
            h2 = hidden.clone().requires_grad_(True)
            ref, stats = tr.objective(h2, head, b, step, span_token_counts=counts)
            rh, rw = torch.autograd.grad(ref, [h2, head])
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed, pack_stats(stats), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-7)


def test_offline_kd_on_a_vocabulary_subset_trains_where_cached_ids_fall_outside_it(world, tmp_path, capsys):
    """The tiny random teacher's top-k ids are spread over all 201,088 ids, so on the data's own
    vocabulary subset many positions keep none of them: those take their label as the one known
    id (`compact_sparse_target`), and offline KD trains (it stopped with a traceback before). KD
    and CE steps alternate: only KD steps log teacher figures, and `vpmoe report` plots the CE."""
    import json

    from tests.test_train_helpers import TEST_MODEL, TEST_RUN
    from vpmoe.kd.objective import is_kd_step
    from vpmoe.train.config import load_run_config
    from vpmoe.train.trainer import Trainer

    text = (TEST_MODEL.replace("max_seq_len = 192", "max_seq_len = 256")
            + TEST_RUN.format(data=world["root"] / "data", run_dir=tmp_path / "run", steps=4)
            .replace("seq_len = 192", "seq_len = 256")
            + f'\n[kd]\nmode = "offline"\ncache = "{world["root"] / "cache"}"\nkd_fraction = 0.5\n'
              '[kd.loss]\ntemperature = 1.0\n')  # a partial loss table: the kind stays the KD default, fkl
    (tmp_path / "run.toml").write_text(text)
    cfg = load_run_config(tmp_path / "run.toml", ['data.vocab_subset="auto"', "train.eval_every=0"])
    tr = Trainer(cfg)
    assert tr.objective.cfg.loss.kind == "fkl"
    assert tr.subset is not None and len(tr.subset) < 5000
    kd_steps = [int(is_kd_step(tr.objective.cfg, s)) for s in range(4)]
    assert 0 < sum(kd_steps) < 4  # both kinds of step in this run
    tr.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kd_step" in r]
    assert [r["kd_step"] for r in steps] == kd_steps
    for r in steps:  # CE steps carry no teacher figures (a 0.0 log-prob would read as probability 1)
        assert math.isfinite(r["loss"]) and r["ce/reasoning"] > 0
        assert ("kl/reasoning" in r) == bool(r["kd_step"]) and ("teacher_logp/final" in r) == bool(r["kd_step"])
        assert not r["kd_step"] or (r["kl/reasoning"] >= 0 and r["teacher_logp/reasoning"] < 0)
    # the report: the train CE as the curve, the teacher figures over the KD steps
    from vpmoe.train.report import write_report
    summary = write_report(tmp_path / "run").read_text()
    assert "| ce/reasoning |" in summary and "| kl/reasoning (KD steps) |" in summary
    assert "| loss |" not in summary and (tmp_path / "run" / "report" / "kd.png").is_file()
    # a resume that changes the KD settings says so, as for the optimizer's
    capsys.readouterr()
    more = load_run_config(tmp_path / "run.toml", ['data.vocab_subset="auto"', "train.eval_every=0",
                                                   "train.steps=5", "kd.kd_fraction=1.0"])
    Trainer(more, resume=True).run()
    assert "kd settings changed since the checkpoint: kd_fraction 0.5 -> 1.0" in capsys.readouterr().out
    # a cache problem met by `vpmoe train` is one line and exit 2, like any configuration error
    code = vpmoe_main(["train", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "other"),
                       "--set", f'kd.cache="{tmp_path / "no_cache"}"'])
    assert code == 2 and "no_cache/manifest.json: teacher cache manifest not found" in capsys.readouterr().err

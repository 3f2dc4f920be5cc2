"""The CUDA-graph train step (`vpmoe.model.graphed.GraphedTrainStep`) and `vpmoe train`'s graphs
against eager steps, and the step's one-micro-batch shortcuts (the clipping norm from the kernel,
the experts' bf16 gradients, the kept bf16 weights, the replicas' hook) against their plain forms.

Run on the GPU machine (bench/gpu_run.sh runs it); CI has no GPU, so this folder is deselected
there by tests/gpu/conftest.py. Split from test_gpu_fast_paths.py (2026-12-05), which keeps the
kernels and the fused body against the reference.
"""

import pytest
import torch

from bench.train_step import Trainer, make_batch
from tests.gpu.helpers import DEV, rel_err, small_cfg
from tests.test_weight_copies import assert_copies_exact
from vpmoe.model import flex as FX
from vpmoe.model import graphed as G
from vpmoe.model import kernels as K


@pytest.mark.parametrize("micro,ac,release,fused_wgrad", [(1, False, False, False), (2, False, False, False),
                                                          (2, True, False, False), (1, False, True, False),
                                                          (1, False, False, True), (2, False, False, True),
                                                          (1, True, False, True), (2, True, False, True)])
def test_graphed_step_matches_eager_step(micro, ac, release, fused_wgrad, monkeypatch):
    """Steps on different batches: eager-launched compiled steps vs the CUDA-graph step (2 eager
    warm-up steps, capture, replays; with micro=2 gradients accumulate over two replays; with ac
    the graphed step checkpoints its blocks, recomputing them inside the captured backward; with
    release, `release()` drops the graphs and their pool after the fourth step and the fifth step
    captures them again; with fused_wgrad, the experts' weight gradients from
    `wgrad.gathered_wgrad`). Same
    losses; parameter updates as close to the eager run as a second eager run is (atomics and bf16
    make runs differ, and AdamW's first steps are nearly sign(g), so tiny gradient differences flip
    whole elements). The same arithmetic in both, so the clipping norm reads every gradient here
    (`graphed.GRAD_SQ` off): its partial sums from the kernel round differently, and these first
    steps amplify a 1e-7 change of the norm into percent-level update differences (2026-12-04);
    that norm has its own test (`test_grad_sq_norm_matches_read_norm`). Likewise the embedding's
    gradient as rows (`graphed.EMBED_ROWS` off here; tests/test_embed_rows.py and
    test_gpu_optimizer.py compare it with the dense gradient) and the experts' bf16 gradients
    (`graphed.LOW_GRADS`, which the graphed step takes at one micro-batch and the eager one never:
    with the gathered weight gradient they are its fp32 sums rounded, and on 2026-12-05 the two
    one-micro-batch cases with it failed by 0.2-0.3 of some updates, as the same rounding does on
    the CPU: tests/test_expert_muon.py; test_low_grads_match_fp32_grads compares the two)."""
    monkeypatch.setattr(K, "FUSED_WGRAD", fused_wgrad)
    monkeypatch.setattr(G, "LOW_GRADS", False)
    monkeypatch.setattr(G, "WEIGHT_COPIES", False)
    monkeypatch.setattr(G, "GRAD_SQ", False)
    monkeypatch.setattr(G, "EMBED_ROWS", False)
    cfg = small_cfg()
    batches = [make_batch(2, 512, seed=s, vocab=cfg.vocab_size) for s in range(5 if micro == 1 else 4)]
    batches = [[{k: v[i::micro] for k, v in b.items()} for i in range(micro)] for b in batches]
    runs = [Trainer(cfg, v, 16, micro, checkpoint=ac and v == "graphed") for v in ("compiled", "compiled", "graphed")]
    # the same optimizer math in all three (the Gram segment kernel: its rounding against the torch
    # path, tested in test_gpu_optimizer.py, would be amplified by AdamW's sign-like first steps here)
    assert all(tr.fopt.gram_kernel for tr in runs)
    p0 = [p.detach().clone() for p in runs[0].model.parameters()]
    first = []  # the memory pool of the graphs captured before a release (not the graph: it would keep it)

    def steps(tr):
        out = []
        for i, b in enumerate(batches):
            if release and i == 4 and tr.graphed is not None:
                first.append(tr.graphed.graphs[0].pool())
                reserved = torch.cuda.memory_reserved()
                tr.graphed.release()
                assert torch.cuda.memory_reserved() < reserved  # the pool went back to the device
                assert tr.graphed.graphs is None and all(p.grad is None for p in tr.model.parameters())
            out.append(float(tr.step(b)))
        return out
    losses = [steps(tr) for tr in runs]
    assert runs[2].graphed.graphs is not None
    if release:
        assert runs[2].graphed.graphs[0].pool() != first[0]  # captured again, in a new pool
    for i, (x, y) in enumerate(zip(losses[0], losses[2])):
        assert abs(x - y) <= 2e-3 * abs(x), (i, losses)
    report = []
    for (name, a), b, c, p in zip(runs[0].model.named_parameters(), runs[1].model.parameters(),
                                  runs[2].model.parameters(), p0):
        e_noise, e_graph = rel_err(b - p, a - p), rel_err(c - p, a - p)
        report.append((e_graph - 3 * e_noise, name, e_noise, e_graph))
    print("graphed vs eager, worst (margin, name, eager noise, graphed):", sorted(report)[-3:])
    bad = [r for r in report if r[3] > 3 * r[2] + 2e-2]
    # each run's losses too: which run is the odd one
    assert not bad, (bad[:6], "losses (eager, eager, graphed):", losses)
    # the masks are rebuilt inside the captured graph: replay it on a block-aligned document layout
    # (random layouts at 512 tokens mostly give the same 128-block tables) and the captured masks'
    # tables become the ones built afresh from it
    def tables(dm):
        return [getattr(m, n).clone() for m in (dm.local, dm.glob) for n in type(m)._TENSOR_ATTRS
                if isinstance(getattr(m, n, None), torch.Tensor)]

    probe = [dict(mb) for mb in batches[-1]]
    for mb in probe:
        doc = torch.zeros_like(mb["doc_ids"])
        doc[:, 128:] += 1
        doc[:, 384:] += 1
        mb["doc_ids"] = doc
    captured = runs[2].body._masks[tuple(probe[0]["doc_ids"].shape)]
    before = tables(captured)
    runs[2].graphed.accumulate(probe)
    fresh = FX.DocMasks(tuple(doc.shape), DEV, cfg.window)
    fresh.update(probe[-1]["doc_ids"])
    want = tables(fresh)
    assert all(torch.equal(a, b) for a, b in zip(tables(captured), want))
    assert not all(torch.equal(a, b) for a, b in zip(before, want))  # the layout did change the tables
    print(f"graphed (micro={micro}, ac={ac}) vs eager: worst margin", max(report), "losses", losses)


@pytest.mark.parametrize("low_grads", [False, True])
def test_grad_sq_norm_matches_read_norm(low_grads, monkeypatch):
    """`graphed.GRAD_SQ` at one micro-batch: the clipping norm takes the expert weights' part from
    the weight-gradient kernel's partial sums of squares. In every step (eager warm-ups, the
    capture's replays) the norm the update used equals the norm read from the same gradients
    (`grad_norm({})`, computed inside the same update, captured with it) to 1e-6, and the partials
    cover every MoE layer's two expert weights; the embedding's part comes from its gradient as
    rows (`EMBED_ROWS`), read here from the dense [V, d] gradient built afresh from the lookup's
    tokens and output gradient (a stale row from an earlier step's batch would show here). With
    `low_grads`, the experts' gradients are bf16 (`LOW_GRADS`, with kept copies) and the read norm
    reads those."""
    monkeypatch.setattr(K, "FUSED_WGRAD", True)
    monkeypatch.setattr(G, "WEIGHT_COPIES", low_grads)
    monkeypatch.setattr(G, "LOW_GRADS", low_grads)
    monkeypatch.setattr(G, "GRAD_SQ", True)
    monkeypatch.setattr(G, "EMBED_ROWS", True)
    original = G.GraphedTrainStep._update_part

    def update_part(self):  # the read norm first: the update may reuse gradient buffers
        out, tokens, weight = self.body.embed_out, self.body.embed_tokens, self.body.model.embed.weight
        embed = torch.zeros_like(weight).index_add_(0, tokens.reshape(-1), out.grad.reshape(-1, weight.shape[1]))
        read = self.opt.grad_norm({}, None, self.body.low_grads())
        self.read_norm = (read.square() + embed.square().sum()).sqrt()
        original(self)
    monkeypatch.setattr(G.GraphedTrainStep, "_update_part", update_part)
    cfg = small_cfg()
    tr = Trainer(cfg, "graphed", 16, 1)
    assert tr.body.grad_sq
    for i in range(5):
        loss = float(tr.step([make_batch(2, 512, seed=i, vocab=cfg.vocab_size)]))
        used, read = float(tr.graphed.grad_norm), float(tr.graphed.read_norm)
        print(f"step {i}: loss {loss:.6f} norm from partials {used:.8f} read {read:.8f}")
        assert abs(used - read) <= 1e-6 * read, (i, used, read)
        assert len(tr.body.known_grad_sq()) == 2 * len(tr.model.moe_layers())
        assert tr.model.embed.weight.grad is None and len(tr.body.embedding_row_grads()) == 1
        assert len(tr.body.low_grads()) == (2 * len(tr.model.moe_layers()) if low_grads else 0)
    assert tr.graphed.graphs is not None


@pytest.mark.parametrize("above_row_limit, micro", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_low_grads_match_fp32_grads(above_row_limit, micro, monkeypatch):
    """`graphed.LOW_GRADS`: the expert weights' gradients in bf16 on their holders against the
    default fp32 gradients on the masters, graphed steps on the same batches (clipping off in both:
    a clip factor that differs in its last bit changes some bf16 roundings of Muon's input, and
    Newton-Schulz amplifies such noise in rank-deficient expert gradients). One micro-batch with
    kept copies (`LOW_GRADS` True); two without copies (`LOW_GRADS` "always": the second
    micro-batch adds into the bf16 gradients in place).
    First step (same weights): with one micro-batch every bf16 gradient element is the other run's
    master gradient element to within one bf16 ulp (the rounding's half ulp, and the two kernels may
    be tuned to different tilings, so their fp32 sums may differ in the last bits). With two, each
    micro-batch's part is rounded and then their bf16 sum, so an element's error scales with its
    parts, which the test cannot see and which may cancel (an element bound by the sum and the
    tensor's RMS failed on the H200 in 9,164 of 33.5M elements of a busy layer, 2026-12-05): each
    expert's gradient is held as a whole instead, within 2^-7 relative in norm (~2.4e-3 seen; a
    stale or missing part would be off by ~0.7 or more). The masters have none. With the fp32 run's expert gradients
    replaced by those bf16 values before its update, both updates agree to 1e-3 relative per
    parameter (Muon's arithmetic is fp32 on the same values either way; the embedding's atomics
    differ; a wrong or stale gradient, or momentum computed in bf16, would be off by 1e-2 or more).
    Later steps (capture, replays): the losses agree to 1e-2 (the runs then differ as two bf16 runs
    do). `above_row_limit`: the weight gradients from grouped GEMMs (micro-batches above the
    gathered kernel's row limit), which the holders take as the GEMMs write them."""
    monkeypatch.setattr(K, "FUSED_WGRAD", True)
    monkeypatch.setattr(G, "WEIGHT_COPIES", micro == 1)
    if above_row_limit:
        monkeypatch.setattr(K, "GATHERED_WGRAD_MAX_ROWS", 0)
    cfg = small_cfg()
    batches = [make_batch(2, 512, seed=s, vocab=cfg.vocab_size) for s in range(5)]
    batches = [[{k: v[i::micro] for k, v in b.items()} for i in range(micro)] for b in batches]
    runs = []
    for low in (False, True if micro == 1 else "always"):
        monkeypatch.setattr(G, "LOW_GRADS", low)
        runs.append(Trainer(cfg, "graphed", 16, micro))
        runs[-1].fopt.max_norm = 0.0
    experts = [{id(p) for m in tr.model.moe_layers() for p in (m.w_up, m.w_down)} for tr in runs]
    for i, b in enumerate(batches):
        before = [[p.detach().clone() for p in tr.model.parameters()] for tr in runs]
        for tr in runs:
            tr.graphed.accumulate(b)
        torch.cuda.synchronize()
        given = runs[1].body.low_grads()
        assert not runs[0].body.low_grads() and set(given) == experts[1]
        worst = 0.0
        for (name, p0), p1 in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
            if id(p1) in given:
                g = given[id(p1)]
                assert p1.grad is None and g.dtype == torch.bfloat16 and g.shape == p1.shape, name
                assert p0.grad.dtype == torch.float32, name
                if i == 0:  # same weights: the same gradient, rounded
                    worst = max(worst, rel_err(g, p0.grad))
                    if micro == 1:  # one rounding of the same fp32 sums: each element within an ulp
                        off = (g.float() - p0.grad).abs() > p0.grad.abs() * 2.0**-8
                        assert not off.any(), (name, int(off.sum()), rel_err(g, p0.grad))
                    else:  # each expert's slice as a whole (docstring)
                        err = (g.float() - p0.grad).flatten(1).norm(dim=1)
                        ref = p0.grad.flatten(1).norm(dim=1)
                        off = err > 2.0**-7 * ref
                        assert not off.any(), (name, off.nonzero().flatten().tolist()[:8], rel_err(g, p0.grad))
                    with torch.no_grad():
                        p0.grad.copy_(g)  # eager warm-up step: its update reads this
        losses = [float(tr.graphed.loss_sum) for tr in runs]
        for tr in runs:
            tr.graphed.update()
        torch.cuda.synchronize()
        print(f"step {i}: losses {losses}, gradient rounding {worst:.2e}")
        if i == 0:
            assert abs(losses[1] - losses[0]) <= 1e-6 * abs(losses[0]), losses
            errs = {}
            for (name, p0), p1, b0, b1 in zip(runs[0].model.named_parameters(), runs[1].model.parameters(), *before):
                d0, d1 = p0.detach() - b0, p1.detach() - b1
                if d0.norm() > 0:
                    errs[name] = rel_err(d1, d0)
            print("worst update differences:", sorted(errs.items(), key=lambda kv: -kv[1])[:4])
            assert max(errs.values()) <= 1e-3, {n: e for n, e in errs.items() if e > 1e-3}
        else:
            assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0]), (i, losses)
        if micro == 1:
            assert_copies_exact(runs[1].body)
    assert runs[1].graphed.graphs is not None


@pytest.mark.parametrize("micro", [1, 2])
def test_weight_copies_match_casting(micro, monkeypatch):
    """`graphed.WEIGHT_COPIES` moves the expert weights' bf16 cast from the forward into the update
    (the same rounding of the same master), so graphed steps with and without it give the same
    numbers: the copies equal the masters' casts bit for bit after every step, and the losses,
    clipping norms and parameters agree to 1e-6 (relative). Not to the bit: the embedding's gradient
    is an atomic scatter-add, and through the clipping norm its last bits may reach every update
    (each step the copies' run takes the other run's embedding, so that noise cannot grow into a
    flipped routing tie later). A one-step-stale copy would move them by orders of magnitude more
    (a step's update is ~1e-3 of a weight or more). Compared with each other, not with an eager run:
    at one micro-batch both take the clipping norm's expert part from the kernel (`GRAD_SQ`), whose
    rounding differs from the eager run's read norm, and these first steps amplify that into
    percent-level update differences (2026-12-04). Five steps: warm-up, capture, replays;
    with micro=2 the graphs are released after the fourth step and captured again at the fifth,
    which must read the copies the released graphs' update wrote."""
    monkeypatch.setattr(K, "FUSED_WGRAD", True)
    monkeypatch.setattr(G, "LOW_GRADS", False)  # fp32 gradients in both (test_low_grads_match_fp32_grads)

    def check(runs):
        # kept from the first micro-batch's staging on (its rows decide whether they would be read)
        assert not runs[0].body.copies and len(runs[1].body.copies) == len(runs[1].model.moe_layers())
        assert_copies_exact(runs[1].body)  # the update kept them equal to the masters' casts

    _assert_graphed_runs_agree(micro, lambda copies: monkeypatch.setattr(G, "WEIGHT_COPIES", copies), {}, check)


def _assert_graphed_runs_agree(micro: int, setting, trainer_kw: dict, check=None) -> None:
    """Two graphed bench trainers of `small_cfg`, built after `setting(False)` and `setting(True)`:
    five steps of 2 x 512 tokens in `micro` micro-batches (warm-up, capture, replays; with two the
    graphs are released after the fourth step and captured again at the fifth) agree to 1e-6
    (relative) in loss, clipping norm and every parameter after every step, the second run's
    embedding aligned to the first's before each step (its atomic scatter-add's last bits reach
    every update through the clipping norm); `check(runs)` after each step."""
    cfg = small_cfg()
    batches = [make_batch(2, 512, seed=s, vocab=cfg.vocab_size) for s in range(5)]
    batches = [[{k: v[i::micro] for k, v in b.items()} for i in range(micro)] for b in batches]
    runs = []
    for on in (False, True):
        setting(on)
        runs.append(Trainer(cfg, "graphed", 16, micro, **trainer_kw))
    for i, b in enumerate(batches):
        if micro == 2 and i == 4:
            for tr in runs:
                tr.graphed.release()
        if i:
            with torch.no_grad():
                runs[1].model.embed.weight.copy_(runs[0].model.embed.weight)
        losses = [float(tr.step(b)) for tr in runs]
        norms = [float(tr.graphed.grad_norm) for tr in runs]
        errs = {name: rel_err(q, p) for (name, p), q in zip(runs[0].model.named_parameters(), runs[1].model.parameters())}
        worst = max(errs, key=errs.get)
        # printed before the asserts (-s): a run cut by a time limit before pytest's report still shows them
        print(f"step {i}: losses {losses}, norms {norms}, worst parameter {worst} {errs[worst]:.2e}", flush=True)
        assert abs(losses[1] - losses[0]) <= 1e-6 * abs(losses[0]), (i, losses)
        assert abs(norms[1] - norms[0]) <= 1e-6 * abs(norms[0]), (i, norms)
        for name, err in errs.items():
            assert err <= 1e-6, (i, name, err)
        if check is not None:
            check(runs)
    assert runs[1].graphed.graphs is not None


@pytest.mark.parametrize("micro,ac", [(1, False), (2, True)])
def test_dense_copies_match_casting(micro, ac, monkeypatch):
    """`dense_linear.DENSE_COPIES` moves the dense weights' bf16 casts out of each block's compiled
    forward into one multi-tensor copy before the blocks (the same rounding of the same masters):
    graphed steps with and without it agree to 1e-6 (relative) in loss, clipping norm and every
    parameter over five steps (warm-up, capture, replays; with two micro-batches and checkpointed
    blocks, whose recompute reads the copies, the graphs released after the fourth step and captured
    again). A copy one step stale would move the parameters by ~1e-3 or more."""
    from vpmoe.model import dense_linear as DL

    def check(runs):
        assert [tr.body.dense_copies is not None for tr in runs] == [False, True]

    _assert_graphed_runs_agree(micro, lambda on: monkeypatch.setattr(DL, "DENSE_COPIES", on), {"checkpoint": ac}, check)


@pytest.mark.parametrize("ac,accum", [(False, 2), (True, 2), (False, 1)])
def test_trainer_cuda_graphs_match_eager(tmp_path, ac, accum):
    """`vpmoe train` on the GPU with train.cuda_graphs on vs off: 2 eager warm-up steps, capture,
    replays with `accum` accumulated micro-batches; the per-step losses agree (bf16, so not bitwise)
    and the graphed run logs the same metrics. With ac, both runs checkpoint their blocks
    (train.activation_checkpointing). With one micro-batch the graphed run's clipping norm takes the
    experts' part from the weight-gradient kernel (`graphed.GRAD_SQ`) and the eager run reads the
    gradients: the first step's logged norms agree (same weights, same batch). The dataset is the
    tests' synthetic one, built here or carried in (VPMOE_GPU_DATA) where the GPU machine lacks the
    tokenizer packages."""
    import os
    from pathlib import Path

    from tests.test_train_helpers import metrics, train_losses, vpmoe, write_config, write_synthetic_parquet
    data = os.environ.get("VPMOE_GPU_DATA")
    if not data:
        parquet = write_synthetic_parquet(tmp_path / "syn.parquet")
        data = tmp_path / "syn192"
        vpmoe("data", "build", "--input", str(parquet), "--out", str(data), "--seq-len", "192",
              "--valid-fraction", "0.1", "--quiet")
    runs, norms = {}, {}
    for mode in ("off", "on"):
        run_dir = tmp_path / f"run_{mode}"
        cfg = write_config(tmp_path / f"{mode}.toml", Path(data), run_dir, steps=6)
        text = cfg.read_text().replace('device = "cpu"', f'device = "cuda"\ncuda_graphs = "{mode}"'
                                       + ("\nactivation_checkpointing = true" if ac else ""))
        assert "grad_accum = 2" in text
        cfg.write_text(text.replace("grad_accum = 2", f"grad_accum = {accum}"))
        vpmoe("train", str(cfg))
        runs[mode] = train_losses(run_dir)
        steps = [r for r in metrics(run_dir) if "grad_norm" in r]
        assert len(steps) == 6 and all(r["grad_norm"] > 0 and "aux_loss" in r for r in steps)
        norms[mode] = steps[0]["grad_norm"]
    print("losses off:", runs["off"], "\nlosses on:", runs["on"], "\nfirst step's norms:", norms)
    assert abs(norms["on"] - norms["off"]) <= 1e-2 * norms["off"], norms
    assert runs["off"].keys() == runs["on"].keys() and len(runs["on"]) == 6
    for step in runs["off"]:
        a, b = runs["off"][step], runs["on"][step]
        assert abs(a - b) <= 2e-2 * abs(a), (step, a, b)


@pytest.mark.parametrize("ac", [False, True])
def test_trainer_cuda_graphs_offline_kd_match_eager(tmp_path, ac):
    """Offline KD through the captured step (`cuda_graphs = on`: cached targets staged per
    micro-batch, one gated loss for KD and CE steps) vs the eagerly launched step: the same KD/CE
    choices and per-step losses, KD and KL metrics; with ac, both runs checkpoint their blocks
    (what `auto` graphs for a stage-2 run on an 80 GB GPU). Data and cache are carried in
    (VPMOE_GPU_DATA, VPMOE_GPU_KD_CACHE: bench/gpu_carry.sh) or built here."""
    import os
    from pathlib import Path

    from tests.test_train_helpers import build_tiny_teacher_cache, metrics, train_losses, vpmoe, write_config
    data, cache = os.environ.get("VPMOE_GPU_DATA"), os.environ.get("VPMOE_GPU_KD_CACHE")
    if not data:
        from tests.test_train_helpers import write_synthetic_parquet
        parquet = write_synthetic_parquet(tmp_path / "syn.parquet")
        data = tmp_path / "syn192"
        vpmoe("data", "build", "--input", str(parquet), "--out", str(data), "--seq-len", "192",
              "--valid-fraction", "0.1", "--quiet")
    if not cache:
        cache = build_tiny_teacher_cache(Path(data), tmp_path / "kd")
    kd = f'\n[kd]\nmode = "offline"\ncache = "{cache}"\nkd_fraction = 0.5\n[kd.loss]\nkind = "fkl"\nce_weight = 0.2\n'
    runs = {}
    for mode in ("off", "on"):
        run_dir = tmp_path / f"run_{mode}"
        cfg = write_config(tmp_path / f"{mode}.toml", Path(data), run_dir, steps=8, extra=kd)
        cfg.write_text(cfg.read_text().replace('device = "cpu"', f'device = "cuda"\ncuda_graphs = "{mode}"'
                                               + ("\nactivation_checkpointing = true" if ac else "")))
        vpmoe("train", str(cfg))
        runs[mode] = [r for r in metrics(run_dir) if "grad_norm" in r]
        assert len(runs[mode]) == 8
    off, on = runs["off"], runs["on"]
    print("kd steps:", [r["kd_step"] for r in on], "\nlosses off:", train_losses(tmp_path / "run_off"),
          "\nlosses on:", train_losses(tmp_path / "run_on"))
    assert [r["kd_step"] for r in off] == [r["kd_step"] for r in on] and 0 < sum(r["kd_step"] for r in on) < 8
    for a, b in zip(off, on):
        for key in ("loss", "kl/reasoning", "kl/final", "teacher_logp/final"):
            if key in a:
                assert abs(a[key] - b[key]) <= 2e-2 * abs(a[key]) + 1e-3, (a["step"], key, a[key], b[key])


def test_graphed_reduce_runs_between_backward_and_update(monkeypatch):
    """`GraphedTrainStep(reduce=...)`, the replicas' hook (`parallel.data_parallel = "replicate"`),
    on one GPU with a hook that zeroes every gradient it is given and the expert loads: in the
    eager warm-up steps and in the captured replays alike the update then sees no gradient, so each
    Muon weight only decays (w * (1 - lr * wd), every element, bf16 expert gradients included) and
    the AdamW weights (no decay in the default config) and router biases stay put. A hook that ran
    after the update, or missed a gradient, moves them by ~lr."""
    monkeypatch.setattr(G, "LOW_GRADS", True)
    cfg = small_cfg()
    tr = Trainer(cfg, "graphed", 16, 1)
    tr.fopt.max_norm = 0.0
    seen = []

    def zero(grads, load_sum):
        seen.append(len(grads))
        for g in grads:
            g.zero_()
        load_sum.zero_()
    tr.graphed = G.GraphedTrainStep(tr.body, tr.loss, tr.fopt, micro=1, reduce=zero)
    assert not tr.body.grad_sq and not tr.body.embed_rows
    group_of = {id(p): g for g in tr.opt.param_groups for p in g["params"]}
    muon = {key for key, g in group_of.items() if g["kind"] == "muon"}
    assert muon and len(muon) < len(group_of)
    for i in range(4):  # two eager warm-up steps, the capture, a replay
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        biases = [m.expert_bias.clone() for m in tr.model.moe_layers()]
        tr.step([make_batch(2, 512, seed=i, vocab=cfg.vocab_size)])
        torch.cuda.synchronize()
        lr = tr.opt.param_groups[0]["lr"]
        for n, p in tr.model.named_parameters():
            if id(p) in muon:
                decay = 1 - group_of[id(p)]["lr"] * group_of[id(p)]["weight_decay"]
                torch.testing.assert_close(p.detach(), before[n] * decay, rtol=1e-6, atol=0, msg=f"step {i}: {n}")
            else:
                assert torch.equal(p.detach(), before[n]), (i, n)
        assert all(torch.equal(b, m.expert_bias) for b, m in zip(biases, tr.model.moe_layers()))
        print(f"step {i}: lr {lr}, the hook saw {seen[-1]} gradients")
    assert tr.graphed.graphs is not None and len(seen) == 4
    held = tr.body.low_grads()  # the experts' bf16 gradients reach the hook too
    assert len(held) == 2 * len(tr.model.moe_layers())
    assert seen[-1] == len(held) + sum(p.grad is not None for p in tr.model.parameters())

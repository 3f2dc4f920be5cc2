"""Fast paths against the reference on the CPU (the GPU versions: tests/gpu/)."""
import pytest
import torch

from vpmoe.model import kernels as K
from vpmoe.model.kernels import (Routing, _DownSum, _GatherGemm, experts_grouped, permute_by_expert,
                                 route_fast)
from vpmoe.model.model import MoE, VpMoE, experts_loop, route_reference
from tests.test_model import randomize, small


def test_permutation_groups_rows_by_expert():
    idx = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1]])
    order, expert_of_row, offsets = permute_by_expert(idx, 4)
    assert expert_of_row.tolist() == sorted(idx.flatten().tolist())
    assert idx.flatten()[order].tolist() == expert_of_row.tolist()
    assert offsets.tolist() == [2, 4, 5, 8]


def test_grouped_experts_match_loop_forward_and_backward():
    cfg = small(n_experts=16, n_groups=4, topk_groups=2, top_k=4, expert_ffn=16)
    moe = randomize(MoE(cfg))
    x = torch.randn(37, cfg.d_model, requires_grad=True)
    idx, w, _ = route_reference(x, moe.router.weight, moe.expert_bias, cfg)
    idx, w = idx.clone(), w.detach()
    idx[0] = torch.tensor([0, 1, 2, 3])  # an expert with rows everywhere, and some experts with none
    results = []
    for fn in (experts_loop, experts_grouped):
        moe.zero_grad()
        x.grad = None
        y = fn(moe, x, idx, w)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        (y * g).sum().backward()
        results.append((y.detach(), x.grad.clone(), moe.w_up.grad.clone(), moe.b_up.grad.clone(),
                        moe.w_down.grad.clone(), moe.b_down.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_with_fast_paths_matches_reference_on_cpu():
    from vpmoe.model.kernels import use_fast_paths
    cfg = small()
    ref = randomize(VpMoE(cfg))
    fast = randomize(VpMoE(cfg))
    use_fast_paths(fast)  # attention falls back to the reference on CPU with grad; MoE is grouped
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 20])
    torch.testing.assert_close(fast(ids, doc_ids=doc).logits, ref(ids, doc_ids=doc).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the fused train-step path

def test_routing_offsets_and_inverse():
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 6, (23, 3), generator=g)
    r = Routing(idx, 8)  # experts 6 and 7 get no rows
    counts = torch.bincount(idx.flatten(), minlength=8)
    assert r.offsets.tolist() == counts.cumsum(0).tolist()
    assert r.expert.tolist() == sorted(idx.flatten().tolist())
    assert torch.equal(r.order[r.inverse], torch.arange(idx.numel()))
    assert torch.equal(r.token, r.order // 3)


def test_gather_gemm_and_down_sum_match_indexing_autograd():
    """The up GEMM that gathers its rows (and again in backward, bias gradient from the ones
    column) and the down GEMM summed per token (bias inside the sum, its gradients from the routing
    weight column) equal autograd through plain indexing and per-expert matmuls (float64), every
    gradient, including an expert with no rows."""
    g = torch.Generator().manual_seed(6)
    N, k, d, n, E = 13, 3, 5, 4, 5
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(N)])  # expert 4: no rows
    r = Routing(idx, E)
    M_ = N * k
    f64 = dict(dtype=torch.float64, generator=g, requires_grad=True)
    x, w, b = torch.randn(N, d, **f64), torch.randn(E, d, n, **f64), torch.randn(E, n, **f64)
    u, c = torch.randn(M_, n, **f64), torch.rand(N, k, **f64)  # c: routing weights in token order
    w2, b2 = torch.randn(E, n, d, **f64), torch.randn(E, d, **f64)
    gh = torch.randn(M_, n, dtype=torch.float64, generator=g)
    gy = torch.randn(N, d, dtype=torch.float64, generator=g)
    leaves = (x, w, b, u, c, w2, b2)

    def plain():
        xs = x[r.token]
        h = torch.cat([xs[r.expert == e] @ w[e] + b[e] for e in range(E)])  # rows are sorted by expert
        c_rows = c.flatten()[r.order]  # sorted-row order
        rows = torch.cat([u[r.expert == e] @ w2[e] + c_rows[r.expert == e, None] * b2[e] for e in range(E)])
        return h, rows[r.inverse].view(N, k, d).sum(1)

    def fast():
        h = _GatherGemm.apply(x, w, b, r.token, r.expert, r.inverse, r.offsets, k)
        return h, _DownSum.apply(u, c, w2, b2, idx, r.inverse, r.token, r.offsets)

    results = []
    for fn in (fast, plain):
        h, y = fn()
        grads = torch.autograd.grad((h * gh).sum() + (y * gy).sum(), leaves)
        results.append([h.detach(), y.detach(), *grads])
    for i in (3, 4, 7, 8):  # the empty expert's weight and bias gradients
        assert results[0][i][4].abs().max() == 0
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("given_low", [False, True])
def test_router_logits_near_fp32_forward_bf16_gradients(given_low):
    """`_RouterLogits` (the CPU runs its math with widened operands): the logits within 5e-5 of
    float64 (bf16 alone: ~3e-3); each gradient equal to the float64 product of the bf16-rounded
    operands (so it is one bf16 GEMM with fp32 sums, nothing more lost), hence within bf16 rounding
    of the exact gradient. The same with w's bf16 cast given (`dense_linear.DenseCopies`' copy)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(512, 256, generator=g, requires_grad=True)
    w = (torch.randn(64, 256, generator=g) * 0.05).requires_grad_()
    gy = torch.randn(512, 64, generator=g)
    out = K._RouterLogits.apply(x, w, w.detach().bfloat16() if given_low else None)
    out.backward(gy)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    x64, w64, g64 = x.detach().double(), w.detach().double(), gy.double()
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    assert rel(out, x64 @ w64.t()) < 5e-5
    assert rel(x64.bfloat16().double() @ w64.t(), x64 @ w64.t()) > 1e-3  # what bf16 logits would lose
    assert rel(x.grad, bf(g64) @ bf(w64)) < 1e-6
    assert rel(w.grad, bf(g64).t() @ bf(x64)) < 1e-6
    assert rel(x.grad, g64 @ w64) < 1e-2 and rel(w.grad, g64.t() @ x64) < 1e-2


def test_routed_experts_keep_no_dispatched_rows_for_backward():
    """Compiled with Inductor's decompositions and the min-cut partitioner (eager kernels), the
    grouped path keeps no [N*k, d]-sized tensor for backward: neither the gathered rows (gathered
    again in backward) nor the down GEMM's output (the routing weight scales its input). Values
    match the uncompiled call (bf16 rows). Inductor itself (its joint-graph passes merge an index in
    backward with the forward's identical one) is checked by tests/gpu/test_gpu_fast_paths.py."""
    N, k, d, H, E = 256, 2, 64, 16, 8
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    weight = torch.rand(N, k, generator=g) + 0.1
    params = [torch.randn(E, d, H, generator=g) / 8, torch.randn(E, H, generator=g) * 0.1,
              torch.randn(E, H, d, generator=g) / 4, torch.randn(E, d, generator=g) * 0.1]
    x = torch.randn(N, d, generator=g).bfloat16()  # the GEMM dtype (the op's meta function wants bf16)
    runs = []
    for fn in (K.routed_experts, torch.compile(K.routed_experts, fullgraph=True, dynamic=False,
                                                backend="aot_eager_decomp_partition")):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, *params)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = fn(leaves[0], idx, *leaves[1:])
        grads = torch.autograd.grad(y, leaves, torch.randn(N, d, generator=torch.Generator().manual_seed(4)))
        runs.append((saved, [y.detach(), *grads]))
    assert max(runs[1][0]) < N * k * d, sorted(runs[1][0])[-4:]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_routed_experts_inductor_writes_each_weight_cast_once():
    """Compiled by Inductor (CPU C++ here; the same partition on the GPU), the forward writes each
    expert weight's bf16 cast once, and that buffer is what backward keeps. With the input
    gradient's transpose in the graph, the partitioner kept the transposed view and Inductor
    wrote the cast a second time for it (the generated code read on the H200, 2026-12-03)."""
    from torch._inductor.utils import run_and_get_code

    N, k, d, H, E = 256, 2, 64, 32, 8
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    leaves = [t.requires_grad_(True) for t in (torch.randn(N, d, generator=g), torch.rand(N, k, generator=g) + 0.1,
              torch.randn(E, d, H, generator=g) / 8, torch.randn(E, H, generator=g) * 0.1,
              torch.randn(E, H, d, generator=g) / 4, torch.randn(E, d, generator=g) * 0.1)]

    def f(x, weight, *params):
        return K.routed_experts(x.bfloat16(), idx, weight, *params).square().sum()

    torch._dynamo.reset()
    loss, (forward_code, *_) = run_and_get_code(torch.compile(f, fullgraph=True, dynamic=False), *leaves)
    for shape in (f"({E}, {d}, {H}), ({d * H}, {H}, 1), torch.bfloat16", f"({E}, {H}, {d}), ({d * H}, {d}, 1), torch.bfloat16"):
        assert forward_code.count(shape) == 1, (shape, forward_code.count(shape))
    loss.backward()  # and the backward runs with what was kept
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_route_fast_matches_reference():
    """Same experts (in order), weights and scores as the reference's three torch.topk calls, for
    the locked grouping (8 groups, keep 4, group score = top-1) and a top-2 group score."""
    for kw in (dict(n_experts=256, n_groups=8, topk_groups=4, top_k=4),
               dict(n_experts=64, n_groups=8, topk_groups=2, top_k=6),
               dict(n_experts=16, n_groups=1, topk_groups=1, top_k=3)):
        cfg = small(**kw)
        g = torch.Generator().manual_seed(kw["top_k"])
        x = torch.randn(300, cfg.d_model, generator=g)
        w = torch.randn(cfg.n_experts, cfg.d_model, generator=g) * 0.3
        bias = torch.randn(cfg.n_experts, generator=g) * 0.05
        ref = route_reference(x, w, bias, cfg)
        got = route_fast(x, w, bias, cfg)
        assert torch.equal(got[0], ref[0]), kw
        for a, b in zip(got[1:], ref[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    xg = x.clone().requires_grad_()  # gradients flow through the scores exactly as in the reference
    wg = w.clone().requires_grad_()
    grads = []
    for fn in (route_reference, route_fast):
        xg.grad = wg.grad = None
        _, weight, scores = fn(xg, wg, bias, cfg)
        (weight.sum() + (scores * torch.randn(scores.shape, generator=torch.Generator().manual_seed(1))).sum()).backward()
        grads.append((xg.grad.clone(), wg.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_fast_body_matches_reference_forward_and_backward():
    """FastBody (merged projections, pointwise TPA, routed_experts, fused MoE block) computes
    `VpMoE.forward(return_hidden=True)`: hidden, aux, loads and every parameter's gradient (fp32)."""
    import copy

    from vpmoe.model.fast import FastBody
    cfg = small(n_layers=5)
    ref = randomize(VpMoE(cfg))
    fast = copy.deepcopy(ref)
    body = FastBody(fast)
    torch.manual_seed(11)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 3 + [1] * 17])
    out = ref(ids, doc_ids=doc, return_hidden=True)
    hidden, aux, load = body(ids, doc)
    torch.testing.assert_close(hidden, out.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, out.aux_loss)
    assert torch.equal(load, out.expert_load)
    g = torch.randn_like(hidden)
    ((out.hidden * g).sum() + out.aux_loss).backward()
    ((hidden * g).sum() + aux).backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        if name == "lm_head.weight":
            continue
        assert a.grad is not None and b.grad is not None, name
        # fp32 sums in another order (biases inside the expert GEMMs, fused projections); the
        # rotary frequencies' gradient sums many cancelling terms, so allow a few fp32 ulps more
        err = ((b.grad - a.grad).norm() / a.grad.norm()).item()
        assert err < 3e-5, (name, err)


def test_fast_body_activation_checkpointing_recomputes_the_same_step():
    """FastBody(checkpoint=True) (train.activation_checkpointing on the fused path): the same
    hidden states, aux loss, loads and parameter gradients as without it (fp32, recomputation is
    deterministic), while autograd keeps far fewer bytes outside the recomputed blocks;
    checkpoint=3 (the first 3 of 5 blocks) the same numbers with a byte count in between."""
    import copy

    from vpmoe.model.fast import FastBody
    cfg = small(n_layers=5)
    plain = randomize(VpMoE(cfg))
    ckpt, part = copy.deepcopy(plain), copy.deepcopy(plain)
    torch.manual_seed(12)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    g = torch.randn(2, 24, cfg.d_model)
    saved = {}
    for name, model, flag in (("plain", plain, False), ("ckpt", ckpt, True), ("part", part, 3)):
        body = FastBody(model, checkpoint=flag)
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden, aux, load = body(ids, doc)
        saved[name] = (hidden, aux, load, total[0])
        ((hidden * g).sum() + aux).backward()
    (h0, a0, l0, bytes0), (h1, a1, l1, bytes1) = saved["plain"], saved["ckpt"]
    for other in (ckpt, part):
        h1, a1, l1, _ = saved["ckpt" if other is ckpt else "part"]
        assert torch.equal(h1, h0) and torch.equal(a1, a0) and torch.equal(l1, l0)
        for (name, a), b in zip(plain.named_parameters(), other.parameters()):
            if a.grad is None:
                assert b.grad is None, name
                continue
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    bytes2 = saved["part"][3]
    assert bytes1 < bytes0 / 3, (bytes1, bytes0)
    # 2 of 5 blocks keep their activations: about 2/5 of the plain run's bytes, well above all-checkpointed
    assert bytes1 + (bytes0 - bytes1) / 5 < bytes2 < bytes0 * 0.6, (bytes1, bytes2, bytes0)


def test_fast_router_bias_update_matches_model():
    import copy

    from vpmoe.model.fast import update_router_biases
    cfg = small()
    a = randomize(VpMoE(cfg))
    b = copy.deepcopy(a)
    load = torch.randint(0, 50, (cfg.n_moe_layers, cfg.n_experts))
    a.update_router_biases(load)
    update_router_biases(b, load)
    for ma, mb in zip(a.moe_layers(), b.moe_layers()):
        assert ma.expert_bias.abs().sum() > 0
        torch.testing.assert_close(mb.expert_bias, ma.expert_bias)


def test_newton_schulz_batched_matches_reference():
    from vpmoe.train.optim import newton_schulz
    from vpmoe.train.optim_fast import newton_schulz_batched
    g = torch.Generator().manual_seed(7)
    for shape in ((3, 6, 10), (4, 12, 5)):
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(newton_schulz_batched(x), newton_schulz(x), rtol=1e-4, atol=1e-5)


def test_gram_newton_schulz_equals_reference_in_float64():
    """The Gram-side iteration is the same polynomial map: in fp64 it matches the reference X-side
    iteration (also fp64 here) to rounding, with and without restarts, wide and tall."""
    from vpmoe.train.optim import NS_COEFFS
    from vpmoe.train.optim_fast import gram_newton_schulz, orthogonalise
    a, b, c = NS_COEFFS
    g = torch.Generator().manual_seed(11)
    for shape in ((3, 8, 40), (2, 48, 6), (5, 16, 64)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 1e-3
        wide = x.mT if shape[1] > shape[2] else x
        ref = wide / (wide.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        for _ in range(5):
            gram = ref @ ref.mT
            ref = a * ref + (b * gram + c * gram @ gram) @ ref
        ref = ref.mT if shape[1] > shape[2] else ref
        for restart in ((), (2,), (1, 3)):
            torch.testing.assert_close(gram_newton_schulz(x, 5, restart_at=restart), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(orthogonalise(x.float(), 5, "gram"), ref.float(), rtol=1e-4, atol=1e-5)
        # and the polar factor is approached: singular values near 1 (the quintic's 0.7-1.2 band)
        s = torch.linalg.svdvals(gram_newton_schulz(x, 5))
        assert s.min() > 0.5 and s.max() < 1.3, s


def test_packed_gram_newton_schulz_equals_one_call_per_tensor():
    """`gram_newton_schulz_packed`: tensors of one matrix shape and different batch sizes, their
    n x n iteration packed into one batch, give what one call per tensor gives (fp64: to rounding;
    fp32: the same ops per matrix), wide and tall, with and without restarts."""
    from vpmoe.train.optim_fast import gram_newton_schulz, gram_newton_schulz_packed
    g = torch.Generator().manual_seed(13)
    for m, n in ((8, 40), (48, 6)):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            xs = [torch.randn(b, m, n, generator=g, dtype=dtype) * 10.0 ** -e for b, e in ((3, 3), (1, 0), (5, 2))]
            for restart in ((), (2,), (1, 3)):
                got = gram_newton_schulz_packed(xs, 5, restart_at=restart)
                assert [t.shape for t in got] == [x.shape for x in xs]
                for x, y in zip(xs, got):
                    torch.testing.assert_close(y, gram_newton_schulz(x, 5, restart_at=restart), rtol=0, atol=tol)


@pytest.mark.parametrize("ns_chunk,ns_method,ns_pack,adamw_alone", [
    (3, "gram", 1, None), (32, "gram", 1, None), (32, "standard", 1, None), (32, "gram", 2, None), (3, "gram", 2, 1000)])
def test_fast_optimizer_matches_reference_step(ns_chunk, ns_method, ns_pack, adamw_alone, monkeypatch):
    """FastMuonAdamW.step == clip_grad_norm_ + MuonAdamW.step over 3 steps (clip active), with
    Newton-Schulz chunks that cut a tensor (3: does not divide the 8 experts) or hold it whole (32),
    by either iteration (the small model's 8 x 32 expert matrices take the Gram-side one), and with
    the experts' Gram-side iterations packed two tensors per call (`ns_pack`; a cut tensor is never
    packed), and with the AdamW tensors of 1000+ elements updated one by one (`ADAMW_ALONE`; the
    embedding and head, at full size) and AdamW weight decay on."""
    import copy

    from vpmoe.train import optim_fast
    from vpmoe.train.optim import OptimConfig, build_optimizer
    from vpmoe.train.optim_fast import FastMuonAdamW
    if adamw_alone is not None:
        monkeypatch.setattr(optim_fast, "ADAMW_ALONE", adamw_alone)
    cfg = small()
    m1 = randomize(VpMoE(cfg))
    m2 = copy.deepcopy(m1)
    # fp32 state: bf16 state would turn the two paths' fp32 rounding differences into whole bf16 steps (the bf16
    # paths are compared in test_train_optim's rounded-recurrence tests)
    ocfg = OptimConfig(adamw_weight_decay=0.1 if adamw_alone is not None else 0.0,  # with it: AdamW's decay too
                       muon_momentum_dtype="float32", adamw_moments_dtype="float32")
    o1, o2 = build_optimizer(m1, ocfg), build_optimizer(m2, ocfg)
    fast = FastMuonAdamW(o2, max_grad_norm=0.2, ns_chunk=ns_chunk, ns_method=ns_method, ns_pack=ns_pack)
    expert_tensors = [p for p in m2.parameters() if p.ndim == 3]
    assert len(expert_tensors) >= 3  # packs of two and a remainder of one per shape
    assert all(fast._packs(p.view(-1, *p.shape[-2:])) == (ns_pack > 1 and ns_chunk >= p.shape[0])
               for p in expert_tensors)
    alone = [p for g in o2.param_groups if g["kind"] == "adamw" for p in g["params"]
             if p.numel() >= optim_fast.ADAMW_ALONE]
    adamw = [p for g in o2.param_groups if g["kind"] == "adamw" for p in g["params"]]
    assert bool(alone) == (adamw_alone is not None) and len(alone) < len(adamw)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    for _ in range(3):
        for m in (m1, m2):
            out = m(ids)
            (out.logits.square().mean() + out.aux_loss).backward()
        n1 = torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.2)
        assert n1 > 0.2  # clipping is active
        o1.step()
        n2 = fast.step()
        torch.testing.assert_close(n2, n1)
        o1.zero_grad()
        o2.zero_grad()
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert o2.state[m2.embed.weight]["step"].item() == 3


def test_hardware_gates_for_the_fast_path_and_graphs():
    """Which GPUs get bf16 + the fused path (sm80+) and CUDA graphs (torch._grouped_mm without a
    host sync: sm90 and sm100 only; an A100 or an sm120 card would fail the capture)."""
    table = {None: (False, False), (7, 0): (False, False), (8, 0): (True, False), (8, 9): (True, False),
             (9, 0): (True, True), (10, 0): (True, True), (12, 0): (True, False)}
    got = {cap: (K.bf16_fast_path_ok(cap), K.grouped_mm_graphable(cap)) for cap in table}
    assert got == table
    assert K.cuda_capability(torch.device("cpu")) is None


def test_activation_checkpointing_setting(monkeypatch):
    """true / false / a block count: how many blocks it covers, in words, and a config error
    naming the key for a count outside [0, n_layers]; the module path takes the same setting."""
    from vpmoe.config import ConfigError
    from vpmoe.config import checkpointed_blocks, describe_checkpointing
    from vpmoe.train.config import load_run_config

    assert [checkpointed_blocks(s, 80) for s in (True, False, 0, 64, 80)] == [80, 0, 0, 64, 80]
    assert [describe_checkpointing(s, 80) for s in (True, False, 64)] == ["on", "off", "on for the first 64 of 80 blocks"]
    cfg = load_run_config("configs/stage1.toml", ["train.activation_checkpointing=64"])
    assert cfg.train.activation_checkpointing == 64
    for bad in ("81", "-1", '"yes"'):
        with pytest.raises(ConfigError, match="train.activation_checkpointing"):
            load_run_config("configs/stage1.toml", [f"train.activation_checkpointing={bad}"])
    # the module path: the first 2 of 3 blocks checkpointed, the same gradients as none
    cfg3 = small(n_layers=3)
    torch.manual_seed(4)
    ids = torch.randint(0, cfg3.vocab_size, (2, 16))
    grads, calls = [], []
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    for setting in (False, 2):
        torch.manual_seed(5)
        model = randomize(VpMoE(cfg3))
        model.gradient_checkpointing = setting
        model.train()
        out = model(ids)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(calls) == 2  # the second run's first two blocks
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_experts", [7, 256, 300])
def test_sort_by_expert_narrow_keys_match_stable_argsort(n_experts):
    """The narrow-key sort (uint8 up to 256 experts, int16 above) gives the same stable order as
    numpy's stable argsort of the int64 ids, and int64 experts (a uint8 index would be a mask)."""
    import numpy as np
    g = torch.Generator().manual_seed(n_experts)
    first = 3
    idx = torch.randint(0, n_experts, (997, 4), generator=g) + first
    idx[0, 0], idx[1, 1] = first + n_experts - 1, first  # both ends of the key range
    expert, order, offsets = K.sort_by_expert(idx, n_experts, first)
    flat = (idx.flatten() - first).numpy()
    ref = np.argsort(flat, kind="stable")
    assert order.tolist() == ref.tolist()
    assert expert.dtype == torch.int64 and expert.tolist() == flat[ref].tolist()
    assert offsets.tolist() == np.cumsum(np.bincount(flat, minlength=n_experts)).tolist()
    assert K.sort_key_dtype(n_experts) == (torch.uint8 if n_experts <= 256 else torch.int16)


def test_flex_kernel_options_per_kind_and_device(monkeypatch):
    """Both layer kinds get the smaller backward tiles on Hopper only; other devices keep torch's
    tiles; an explicit setting (the benches' sweeps) wins everywhere."""
    from vpmoe.model import flex as FX

    cuda = torch.device("cuda", 0)
    for major, tiles in ((9, FX.HOPPER_FLEX_OPTIONS), (8, {}), (10, {})):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert FX.flex_kernel_options("local", cuda) == tiles
        assert FX.flex_kernel_options("global", cuda) == tiles
    assert FX.flex_kernel_options("local", torch.device("cpu")) == {}
    assert FX.flex_kernel_options("global", torch.device("cpu")) == {}
    monkeypatch.setitem(FX.FLEX_KERNEL_OPTIONS, "local", {})
    monkeypatch.setitem(FX.FLEX_KERNEL_OPTIONS, "global", {"bwd_BLOCK_N1": 64})
    assert FX.flex_kernel_options("local", cuda) == {}
    got = FX.flex_kernel_options("global", torch.device("cpu"))
    assert got == {"bwd_BLOCK_N1": 64} and got is not FX.FLEX_KERNEL_OPTIONS["global"]  # a copy Flex may keep

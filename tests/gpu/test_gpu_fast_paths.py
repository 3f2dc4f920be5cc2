"""GPU fast paths against the reference, forward and backward, bf16 tolerances.

Run on the GPU machine (bench/gpu_run.sh runs it); CI has no GPU, so this folder is deselected
there by tests/gpu/conftest.py. Every check draws fresh random inputs (no zeros) and can fail.
bf16 comparisons of whole models are made against an fp32 reference: the fast path must not be
much worse than the reference model's own bf16 autocast run (routing flips in near-tied tokens
make any two bf16 runs differ by more than a per-op tolerance).
"""
import copy

import pytest
import torch

from tests.gpu.helpers import DEV, rel_err, small_cfg
from vpmoe.model import flex as FX
from vpmoe.model import kernels as K
from vpmoe.model.fast import FastBody
from vpmoe.model.model import MoE, VpMoE, alibi_slopes, attention_reference, experts_loop, positions_from_docs


@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("window,alibi", [(128, False), (None, True)])
def test_flex_attention_matches_reference(window, alibi, expand, monkeypatch):
    """Flex with sinks (and ALiBi) against the reference, forward and backward; with k/v copied out
    to one kv head per query head (`FX.EXPAND_KV`, taken at this size) and with Flex's own GQA."""
    kind = "local" if window else "global"
    monkeypatch.setitem(FX.EXPAND_KV, kind, expand)
    B, H, G, T, D = 2, 8, 2, 1024, 128
    probe = torch.empty(B, G, T, D, device=DEV, requires_grad=True)
    assert FX.expand_kv_pays(kind, probe, H) == expand
    with torch.no_grad():  # forwards alone never copy
        assert not FX.expand_kv_pays(kind, probe, H)
    doc = torch.zeros(B, T, dtype=torch.long, device=DEV)
    doc[0, 300:] = 1
    doc[0, 700:] = 2
    doc[1, 900:] = 1
    pos = positions_from_docs(doc)
    q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, G, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, G, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(H, device=DEV, requires_grad=True)
    slopes = alibi_slopes(H).to(DEV) if alibi else None
    grads = []
    for fn in (attention_reference, FX.attention_flex):
        for t in (q, k, v, sinks):
            t.grad = None
        out = fn(q, k, v, sinks, pos, pos, doc, doc, window, slopes)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v, sinks)])
    for name, ref, got in zip(["out", "dq", "dk", "dv", "dsink"], *grads):
        assert rel_err(got, ref) < 2e-2, (name, rel_err(got, ref))


def test_grouped_experts_match_loop_bf16():
    cfg = small_cfg(n_layers=2, n_experts=256)
    moe = MoE(cfg).to(DEV)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(4096, cfg.d_model, device=DEV, requires_grad=True)
    outs = []
    for fn in (experts_loop, K.experts_grouped):
        moe.dispatcher = fn
        moe.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, load = moe(x.view(2, 2048, -1))
        (y.float() * torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)).sum().backward()
        outs.append([y.detach(), x.grad.clone(), moe.w_up.grad.clone(), moe.b_up.grad.clone(),
                     moe.w_down.grad.clone(), moe.b_down.grad.clone(), moe.router.weight.grad.clone()])
    for name, ref, got in zip(["y", "dx", "dw_up", "db_up", "dw_down", "db_down", "drouter"], *outs):
        assert rel_err(got, ref) < 2e-2, (name, rel_err(got, ref))


def test_grouped_experts_compiled_keep_no_dispatched_rows():
    """Compiled by Inductor as in the step, `kernels.routed_experts` saves no [N*k, d]-sized tensor
    for backward (the gathered rows are gathered again in backward; the down GEMM's output is not
    needed): what lets more blocks skip activation checkpointing (docs/performance.md)."""
    N, k, d, H, E = 16384, 4, 1024, 128, 256  # N*k*d above the bf16 weight copies' size (E*d*H)
    g = torch.Generator(device=DEV).manual_seed(5)
    idx = torch.rand(N, E, device=DEV, generator=g).topk(k, dim=-1).indices
    leaves = [t.requires_grad_(True) for t in (
        torch.randn(N, d, device=DEV, generator=g).bfloat16(), torch.rand(N, k, device=DEV, generator=g),
        torch.randn(E, d, H, device=DEV, generator=g) / 32, torch.randn(E, H, device=DEV, generator=g) * 0.1,
        torch.randn(E, H, d, device=DEV, generator=g) / 11, torch.randn(E, d, device=DEV, generator=g) * 0.1)]
    fn = torch.compile(K.routed_experts, fullgraph=True, dynamic=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.numel(), tuple(t.shape))) or t,
                                                  lambda t: t):
        y = fn(leaves[0], idx, *leaves[1:])
    assert max(saved)[0] < N * k * d, sorted(saved)[-3:]
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)


def _pair(cfg, decisive_router: bool, seed: int = 0):
    torch.manual_seed(seed)
    ref = VpMoE(cfg).to(DEV)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # no zero biases / sinks hiding a term
            if name.endswith(("bias", "sinks", "b_up", "b_down")):
                p.normal_(0, 0.02)
        if decisive_router:  # fewer near-tied expert choices for bf16 noise to flip
            for m in ref.moe_layers():
                m.router.weight.normal_(0, 0.2)
    return ref, copy.deepcopy(ref)


def _inputs(cfg, B=2, T=1024):
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=DEV)
    doc = torch.zeros_like(ids)
    doc[0, 600:] = 1
    doc[1, 100:] = 1
    doc[1, 900:] = 2
    return ids, doc


def _grads(model):
    L = model.layers
    return [model.embed.weight.grad, L[1].attn.a_q.weight.grad, L[1].attn.log_freq.grad, L[3].attn.wq.weight.grad,
            L[3].attn.sinks.grad, L[2].ffn.w_down.grad, L[2].ffn.b_up.grad, L[2].ffn.router.weight.grad]


GRAD_NAMES = ["embed", "a_q", "log_freq", "wq", "sinks", "w_down", "b_up", "router"]


def _reference_run(model, ids, doc, g, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, doc_ids=doc, return_hidden=True)
    ((out.hidden.float() * g).sum() + out.aux_loss).backward()
    return [out.hidden.detach().float()] + [t.clone() for t in _grads(model)], out.expert_load


def _fast_run(model, ids, doc, g, body=None, **kw):
    body = body or FastBody(model, **kw)  # a body built earlier for this model: no recompilation
    hidden, aux, load = body(ids, doc)
    ((hidden.float() * g).sum() + aux).backward()
    return [hidden.detach().float()] + [t.clone() for t in _grads(model)], load, body


def test_router_logits_bf16x3_near_fp32():
    """The router's logits (bf16x3) against float64: far closer than TF32 or bf16 would be; the
    gradients equal the bf16 GEMM of the rounded operands (fp32 sums); the flag is on where torch
    supports `mm(out_dtype=)`."""
    assert K.bf16x3_available(torch.device(DEV))
    x = torch.randn(4096, 1024, device=DEV, requires_grad=True)
    w = (torch.randn(256, 1024, device=DEV) * 0.03).requires_grad_()
    g = torch.randn(4096, 256, device=DEV)
    out = K.router_logits(x, w, bf16x3=True)
    out.backward(g)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    errs = [rel_err(out, x64 @ w64.t()), rel_err(x.grad, bf(g64) @ bf(w64)), rel_err(w.grad, bf(g64).t() @ bf(x64))]
    print("bf16x3 logits rel err, bf16 gradients vs rounded-operand float64 (dx, dw):", errs)
    assert max(errs) < 5e-5, errs
    # the forward is the Triton kernel (router_fused) here: the same function as torch's bf16x3
    x_pad = torch.randn(4095, 1032, device=DEV)[:, :1024]  # a partial row tile, a padded row stride
    torch_x3 = K.mm_bf16x3(x_pad, w.detach().t())
    exact = x_pad.double() @ w.detach().double().t()
    kernel = K.router_logits(x_pad, w.detach(), bf16x3=True)
    print("kernel vs torch bf16x3, vs float64 (kernel, torch):",
          rel_err(kernel, torch_x3), rel_err(kernel, exact), rel_err(torch_x3, exact))
    assert rel_err(kernel, torch_x3) < 1e-5 and rel_err(kernel, exact) < 5e-5  # fp32 sums' order: ~2e-6


def test_router_logits_kernel_every_config():
    """Each of the router kernel's tile configs, forced in turn (the tuner picks per token bucket, so
    small batches may take tiles no 16k-row tuning picked): the same logits as torch's bf16x3 at a
    token count that leaves partial row tiles."""
    import triton

    from tests.gpu.helpers import forced_config
    from vpmoe.model import router_fused as RF

    x = torch.randn(4095, 1024, device=DEV)
    w = torch.randn(256, 1024, device=DEV) * 0.03
    want = K.mm_bf16x3(x, w.t())
    tuner = RF._tuned()
    assert len(tuner.configs) == len(RF.CONFIGS)
    errors, unlaunchable = {}, []
    for config in tuner.configs:  # every config, then one verdict: a run names all that fail
        try:
            with forced_config(tuner, config):
                errors[str(config)] = rel_err(RF.router_logits_fused(x, w), want)
        except triton.runtime.errors.OutOfResources as e:  # a config this GPU cannot launch at all
            unlaunchable.append((str(config), str(e)[:120]))
    print("router logits per config (relative error):", errors)
    assert not unlaunchable, unlaunchable
    assert all(e < 1e-5 for e in errors.values()), errors


def test_route_fast_cuda_matches_reference():
    """Compiled, the sigmoid and sums may round differently from eager by an ulp, so a token whose
    top-k boundary is a near-tie (gap below 1e-5) may pick differently; every other token must
    pick the same experts with the same weights. (Exact equality failed once in 4096 tokens.)"""
    cfg = small_cfg(n_experts=256)
    x = torch.randn(4096, cfg.d_model, device=DEV)
    w = torch.randn(cfg.n_experts, cfg.d_model, device=DEV) * 0.05
    bias = torch.randn(cfg.n_experts, device=DEV) * 0.01
    ref = K.M.route_reference(x, w, bias, cfg)
    got = torch.compile(K.route_fast, dynamic=False)(x, w, bias, cfg)
    same = (got[0] == ref[0]).all(-1)
    biased = ref[2] + bias
    ranked = biased.sort(-1, descending=True).values  # any near-tie among the leading candidates
    groups = biased.view(len(x), cfg.n_groups, -1).topk(cfg.top_k // cfg.topk_groups, -1).values.sum(-1)
    near_tie = ((ranked[:, :4 * cfg.top_k].diff(dim=-1).abs() < 1e-5).any(-1)
                | (groups.sort(-1).values.diff(dim=-1).abs() < 1e-5).any(-1))
    assert (same | near_tie).all(), (~same & ~near_tie).nonzero()[:5]
    assert same.float().mean() > 0.995
    torch.testing.assert_close(got[1][same], ref[1][same])


def test_route_kernel_cuda_matches_torch_path():
    """`route_fused.route_with_stats` with the kernels against the same function on the torch path
    (ROUTE_KERNEL off, eager) at vpMoE's routing (2 rows x 2048 tokens, 256 experts): the same
    experts except at near-ties (the kernel's sigmoid may round by an ulp), the same loads up to those
    tokens, weights, aux loss and the gradients of x and the router weight to fp32 rounding, then
    the kernels compiled inside a graph give the eager kernels' bits."""
    from vpmoe.model import route_fused as RS

    cfg = small_cfg(n_experts=256)
    torch.manual_seed(0)
    x0 = torch.randn(4096, cfg.d_model, device=DEV)
    w0 = torch.randn(cfg.n_experts, cfg.d_model, device=DEV) * 0.05
    bias = torch.randn(cfg.n_experts, device=DEV) * 0.01
    gw = torch.randn(4096, cfg.top_k, device=DEV)
    runs, default = [], RS.ROUTE_KERNEL
    for on in (False, True):
        RS.ROUTE_KERNEL = on
        try:
            x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            out = RS.route_with_stats(x, w, bias, cfg, 2)
            ((out[1] * gw).sum() + 100 * out[2]).backward()
            runs.append((*out, x.grad, w.grad))
        finally:
            RS.ROUTE_KERNEL = default
    (i0, w_0, a0, l0, gx0, gw0), (i1, w_1, a1, l1, gx1, gw1) = runs
    same = (i0 == i1).all(-1)
    assert same.float().mean() > 0.998, same.float().mean()
    assert (l0 - l1).abs().sum() <= 2 * cfg.top_k * (~same).sum()
    torch.testing.assert_close(w_1[same], w_0[same])
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=0)
    assert rel_err(gx1[same], gx0[same]) < 1e-5, rel_err(gx1[same], gx0[same])  # a token's own routing
    if same.all():  # the weight's gradient sums every token's
        assert rel_err(gw1, gw0) < 1e-5, rel_err(gw1, gw0)
    RS.ROUTE_KERNEL = True
    try:
        compiled = torch.compile(lambda a, b: RS.route_with_stats(a, b, bias, cfg, 2), dynamic=False)(x0, w0)
    finally:
        RS.ROUTE_KERNEL = default
    assert torch.equal(compiled[0], i1) and torch.equal(compiled[1], w_1) and torch.equal(compiled[3], l1)


def test_routing_sort_cuda_matches_cpu():
    """The narrow-key stable sort on CUDA (uint8 keys, CUB radix sort), eager and compiled, gives
    the CPU's order, experts and group ends at the step's size (65,536 tokens x top-4 of 256)."""
    idx = torch.rand(65536, 256, device=DEV).topk(4, -1).indices
    want = [t.cpu() for t in K.sort_by_expert(idx.cpu(), 256)]
    for fn in (K.sort_by_expert, torch.compile(K.sort_by_expert, dynamic=False)):
        got = fn(idx, 256)
        for w_, g_ in zip(want, got):
            assert torch.equal(g_.cpu(), w_)


@pytest.mark.parametrize("fused_moe", [False, True])
def test_fast_body_fp32_matches_reference(fused_moe):
    """fp32, tf32 off: the fused body (Flex attention, merged projections, TPA, routing, loop
    experts, or moe_fused's kernels) computes the reference function; eager (no compile)."""
    cfg = small_cfg()
    ref, fast = _pair(cfg, decisive_router=False)
    ids, doc = _inputs(cfg)
    g = torch.randn(*ids.shape, cfg.d_model, device=DEV)
    torch.backends.cuda.matmul.allow_tf32 = False  # conftest restores the process's setting
    a, load_a = _reference_run(ref, ids, doc, g, False)
    b, load_b, body = _fast_run(fast, ids, doc, g, compile=False, dtype=torch.float32, fused_moe=fused_moe)
    assert body.fused_moe == fused_moe
    assert torch.equal(load_a, load_b)
    for name, x, y in zip(["hidden"] + GRAD_NAMES, a, b):
        assert rel_err(y, x) < 2e-3, (name, rel_err(y, x))


@pytest.mark.parametrize("f32_weight_grads", [False, True])
def test_fast_body_bf16_compiled_no_worse_than_reference_bf16(f32_weight_grads, monkeypatch):
    """bf16: the compiled fast body's error against fp32 is at most ~1.5x the reference's own
    bf16-autocast error (+ a small floor), forward and backward, averaged over three random models
    (one model alone is noisy: a few flipped expert choices move a small gradient such as the
    sinks' by 2x either way); and it compiles without breaks. Also with the dense layers' weight
    gradients as a bf16 GEMM widened by a cast and each block casting its own dense weights
    (`dense_linear.F32_WEIGHT_GRADS` off; on is the default, with `DenseCopies`)."""
    from vpmoe.model import dense_linear as DL

    monkeypatch.setattr(DL, "F32_WEIGHT_GRADS", f32_weight_grads)
    cfg = small_cfg()
    torch.backends.cuda.matmul.allow_tf32 = False  # conftest restores the process's setting
    errs: dict[str, list] = {}
    fast_model = body = None
    for seed in range(3):
        base, _ = _pair(cfg, decisive_router=True, seed=seed)
        ids, doc = _inputs(cfg)
        g = torch.randn(*ids.shape, cfg.d_model, device=DEV)
        exact, _ = _reference_run(copy.deepcopy(base), ids, doc, g, False)
        ref_bf16, _ = _reference_run(copy.deepcopy(base), ids, doc, g, True)
        if body is None:  # one fast body (one compilation); later models are loaded into it
            fast_model = copy.deepcopy(base)
        else:
            fast_model.load_state_dict(base.state_dict())
            fast_model.zero_grad(set_to_none=True)
        fast, _, body = _fast_run(fast_model, ids, doc, g, body=body)
        for name, x, r, f in zip(["hidden"] + GRAD_NAMES, exact, ref_bf16, fast):
            errs.setdefault(name, []).append((rel_err(r, x), rel_err(f, x)))
    assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
    print("rel err vs fp32 per seed (reference bf16, fast bf16):",
          {k: [(f"{a:.2e}", f"{b:.2e}") for a, b in v] for k, v in errs.items()})
    for name, pairs in errs.items():
        e_ref, e_fast = (sum(col) / len(col) for col in zip(*pairs))
        assert e_fast <= 1.5 * e_ref + 5e-3, (name, e_ref, e_fast)

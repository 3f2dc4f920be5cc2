"""The optimizer's GPU paths against their references: Newton-Schulz (standard, Gram-side, packed,
the Gram segment kernel) against float64, and `FastMuonAdamW` (streams, CUDA-graph replay, its
Triton flags) against the plain Muon+AdamW step. Run on the GPU machine (bench/gpu_run.sh); CI has
no GPU, so tests/gpu/conftest.py deselects this folder there. Fresh random inputs; every check can
fail.
"""
import copy

import pytest
import torch

from tests.gpu.helpers import DEV, rel_err, small_cfg
from vpmoe.model.model import VpMoE
from vpmoe.train.optim import OptimConfig, build_optimizer, newton_schulz
from vpmoe.train.optim_fast import FastMuonAdamW


def ns_exact(x: torch.Tensor) -> torch.Tensor:
    """The quintic Newton-Schulz iteration in float64 (`optim.newton_schulz`: on the wide orientation)."""
    return newton_schulz(x.double(), 5, dtype=torch.float64)


def test_gram_newton_schulz_no_worse_than_standard():
    """The optimizer's Gram-side Newton-Schulz (fp16 small side, bf16 products, one restart) vs the
    X-side bf16 iteration, both against the same iteration in float64, at the experts' shape, on
    Gaussian, low-rank (few tokens reached the expert) and wide-spectrum inputs."""
    from vpmoe.train.optim_fast import gram_newton_schulz, newton_schulz_batched

    torch.manual_seed(3)
    u, _, v = torch.linalg.svd(torch.randn(64, 1024, 128, device=DEV), full_matrices=False)
    spectra = {"gaussian": None,
               "rank4+noise": torch.cat([torch.ones(4), torch.full((124,), 1e-3)]).to(DEV),
               "log-uniform 1e-5..1": torch.logspace(-5, 0, 128, device=DEV)}
    for name, s in spectra.items():
        x = torch.randn(64, 1024, 128, device=DEV) if s is None else u @ torch.diag_embed(s.expand(64, -1)) @ v
        x = (x * 3e-4).bfloat16()  # gradient-like magnitude, and the bf16 input both methods get
        ref = ns_exact(x)
        e_std = rel_err(newton_schulz_batched(x), ref)
        e_gram = rel_err(torch.compile(gram_newton_schulz, dynamic=False)(x), ref)
        print(f"NS rel err vs fp64 ({name}): standard {e_std:.2e}, gram {e_gram:.2e}")
        assert e_gram <= 1.25 * e_std + 2e-3, (name, e_std, e_gram)


def test_packed_gram_newton_schulz_cuda_matches_per_tensor():
    """`gram_newton_schulz_packed` on CUDA (bf16 products, fp16 small side, as the optimizer runs
    it), compiled and replayed from a CUDA graph: three expert-shaped tensors packed give what one
    call per tensor gives, up to the GEMMs' kernel choice for a bigger batch, and stay as close to
    the float64 iteration."""
    from vpmoe.train.optim_fast import gram_newton_schulz, gram_newton_schulz_packed

    torch.manual_seed(5)
    xs = [(torch.randn(n, 1024, 128, device=DEV) * 3e-4).bfloat16() for n in (64, 64, 32)]
    packed = torch.compile(gram_newton_schulz_packed, dynamic=False)
    compiled = packed(xs)
    static = [x.clone() for x in xs]
    packed(static)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = packed(static)
    for s_, x in zip(static, xs):
        s_.copy_(x * 2)  # Newton-Schulz is scale-invariant: new inputs, the same results
    graph.replay()
    for x, e, o in zip(xs, compiled, out):
        one = gram_newton_schulz(x)
        ref = ns_exact(x)
        print(f"packed vs per-tensor {rel_err(e, one):.2e}, vs fp64 packed {rel_err(e, ref):.2e} "
              f"per-tensor {rel_err(one, ref):.2e}, graph replay vs compiled {rel_err(o, e):.2e}")
        assert rel_err(e, one) <= 1e-2
        assert rel_err(e, ref) <= 1.1 * rel_err(one, ref) + 1e-3
        assert rel_err(o, e) <= 1e-2


def test_gram_segment_kernel_cuda_matches_torch_path():
    """`ns_gram.gram_segment` (one Triton program per 128 x 128 matrix, the segment on chip) against
    the torch path on CUDA, which rounds at the same points (fp16 Z, Z@Q, Z@R, (ZR)@Z; fp32 sums),
    for both of the optimizer's segments on expert-shaped Grams: close to it, and as close to the
    same segment in float64. Then the whole packed Newton-Schulz with the kernel, compiled and
    replayed from a CUDA graph, against without it."""
    from vpmoe.train import ns_gram
    from vpmoe.train.optim import NS_COEFFS
    from vpmoe.train.optim_fast import gram_newton_schulz_packed

    a, b, c = NS_COEFFS
    torch.manual_seed(6)
    x = (torch.randn(512, 128, 1024, device=DEV) * torch.logspace(-1, 0.5, 128, device=DEV)[:, None]).bfloat16()
    r = torch.bmm(x, x.mT, out_dtype=torch.float32)
    r = (r / r.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]).half()
    for steps in (2, 3):
        got = ns_gram.gram_segment(r, steps, a, b, c)
        ref = ns_gram.gram_segment_reference(r, steps, a, b, c)
        exact = ns_gram.gram_segment_reference(r.double(), steps, a, b, c)
        equal = (got == ref).float().mean().item()
        print(f"gram segment ({steps} steps): kernel vs torch {rel_err(got, ref):.2e} ({equal:.0%} bit-equal), "
              f"vs float64 kernel {rel_err(got, exact):.2e} torch {rel_err(ref, exact):.2e}")
        assert rel_err(got, ref) < 2e-3
        assert rel_err(got, exact) <= 1.1 * rel_err(ref, exact) + 1e-4
    xs = [(torch.randn(n, 1024, 128, device=DEV) * 3e-4).bfloat16() for n in (64, 32)]
    packed = torch.compile(gram_newton_schulz_packed, dynamic=False)
    without = packed(xs)
    static = [t.clone() for t in xs]
    packed(static, kernel=True)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = packed(static, kernel=True)
    graph.replay()
    for o, w, t in zip(out, without, xs):
        print(f"packed NS, kernel vs torch {rel_err(o, w):.2e}; vs float64 kernel {rel_err(o, ns_exact(t)):.2e} "
              f"torch {rel_err(w, ns_exact(t)):.2e}")
        assert rel_err(o, w) < 1e-2
        assert rel_err(o, ns_exact(t)) <= 1.1 * rel_err(w, ns_exact(t)) + 1e-3


def set_grads(m, gs):
    """Gradients for an optimizer step, copied into the existing ones (a captured step reads those)."""
    for p, g in zip(m.parameters(), gs):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def eager_steps_vs_captured(m1, f1, m2, f2, grads):
    """f1 steps eagerly on each gradient set; f2 steps eagerly on the first (compiling), then from a
    captured CUDA graph replayed on the others; their gradient norms must agree."""
    norms1, norms2 = [], []
    for gs in grads:
        set_grads(m1, gs)
        norms1.append(f1.step())
    set_grads(m2, grads[0])
    norms2.append(f2.step().clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = f2.step(refresh_lr=False)
    for gs in grads[1:]:
        set_grads(m2, gs)
        graph.replay()
        norms2.append(norm.clone())
    torch.testing.assert_close(torch.stack(norms2), torch.stack(norms1), rtol=1e-6, atol=0)


# (Muon momentum, AdamW tables' moments): fp32; bf16 table moments; bf16 both, the defaults. The last failed on an
# H200 on 2026-12-07 (layers.0.attn.a_q: 0.107 against the reference's 0.032): the compiled 2-D path's generated
# code applied the recurrence twice in the update; the bf16 store now happens outside the graph (`_store_momentum`,
# 51b4210), and all four cases passed on an H100 at 15:04 the same day
STATES = [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("ns_pack,streams,stream_experts", [(1, 1, False), (2, 1, False), (2, 3, False), (2, 3, True)])
def test_fast_optimizer_no_worse_than_reference_step(ns_pack, streams, stream_experts, state, monkeypatch):
    """FastMuonAdamW (compiled fused kernels, chunked bf16 Newton-Schulz, Q@X form; with ns_pack 2
    the experts' Gram-side iterations packed two tensors per call; with streams 3 its pieces on
    three CUDA streams; with stream_experts the experts' step as expert_muon's kernels, the
    default) vs clip_grad_norm_ +
    MuonAdamW.step on the GPU, both against the reference step in fp32 on the CPU: the fast
    update's error is at most ~1.5x the reference GPU step's own bf16 error. `state`: the Muon momentum's
    and the embedding's and head's AdamW moments' dtypes."""
    from vpmoe.train import optim_fast
    monkeypatch.setattr(optim_fast, "ADAMW_ALONE", 1 << 20)  # the embedding and head: the compiled AdamW
    cfg = small_cfg(n_layers=3)
    torch.manual_seed(1)
    m_ref = VpMoE(cfg).to(DEV)
    m_fast, m_cpu = copy.deepcopy(m_ref), copy.deepcopy(m_ref).cpu()
    ocfg = OptimConfig(muon_momentum_dtype=state[0], adamw_moments_dtype=state[1])
    o_ref, o_fast, o_cpu = (build_optimizer(m, ocfg) for m in (m_ref, m_fast, m_cpu))
    # chunks of 16 of the 64 experts; packing takes whole tensors
    fast = FastMuonAdamW(o_fast, max_grad_norm=1.0, ns_chunk=16 if ns_pack == 1 else 64, ns_pack=ns_pack,
                         streams=streams, stream_experts=stream_experts)
    packed = [fast._packs(p.view(-1, *p.shape[-2:])) for p in m_fast.parameters() if p.ndim == 3]
    assert packed and all(packed) == (ns_pack > 1), packed
    assert all(fast._streams(p) == stream_experts for p in m_fast.parameters() if p.ndim == 3)
    assert sum(p.numel() >= optim_fast.ADAMW_ALONE for p in o_fast.param_groups[-1]["params"]) == 2
    p0 = [p.detach().clone() for p in m_ref.parameters()]
    for step in range(2):
        for a, b, c in zip(m_ref.parameters(), m_fast.parameters(), m_cpu.parameters()):
            a.grad = torch.randn_like(a) * (0.05 if step == 0 else 1e-4)  # clip active, then not
            b.grad, c.grad = a.grad.clone(), a.grad.cpu()
        n_ref = torch.nn.utils.clip_grad_norm_(m_ref.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(m_cpu.parameters(), 1.0)
        o_ref.step()
        o_cpu.step()
        n_fast = fast.step()
        assert abs(n_ref.item() - n_fast.item()) <= 1e-4 * n_ref.item()
    worst = []
    for (name, a), b, c, p in zip(m_ref.named_parameters(), m_fast.parameters(), m_cpu.parameters(), p0):
        exact = c.to(DEV) - p
        e_ref, e_fast = rel_err(a - p, exact), rel_err(b - p, exact)
        worst.append((e_fast - 1.5 * e_ref, name, e_ref, e_fast))
    print("optimizer: worst (fast - 1.5 ref) margins:", sorted(worst)[-4:])
    bad = [(name, e_ref, e_fast) for margin, name, e_ref, e_fast in worst if margin > 1e-3]
    assert not bad, bad


def test_fast_optimizer_on_streams_replays_from_a_graph_as_one_stream():
    """FastMuonAdamW with its pieces on three streams, captured in a CUDA graph (as the trainer runs
    it) and replayed on new gradients, gives the parameters, momenta and norms of the one-stream
    step run eagerly: the streams' fork and join order everything each piece reads."""
    cfg = small_cfg(n_layers=3)
    torch.manual_seed(2)
    m1 = VpMoE(cfg).to(DEV)
    m3 = copy.deepcopy(m1)
    f1, f3 = (FastMuonAdamW(build_optimizer(m, OptimConfig()), max_grad_norm=1.0, ns_chunk=64, ns_pack=2,
                            streams=n, stream_experts=False) for m, n in ((m1, 1), (m3, 3)))
    grads = [[torch.randn_like(p) * scale for p in m1.parameters()] for scale in (0.05, 1e-4, 0.02)]

    eager_steps_vs_captured(m1, f1, m3, f3, grads)
    for (name, a), b in zip(m1.named_parameters(), m3.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
        sa, sb = f1.opt.state[a], f3.opt.state[b]
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def flag_captured_vs_eager(seed: int, flag: dict, tol: float, reference: dict | None = None) -> tuple:
    """FastMuonAdamW with `flag` (keyword arguments) captured in a CUDA graph and replayed, against
    `reference` (default: its defaults) run eagerly, over three steps of fresh gradients on a small model: every expert
    update within `tol` relative of the default's, everything else equal (no flag touches the 2-D
    matrices or AdamW tensors), the norms equal. Returns the worst (error, name)."""
    cfg = small_cfg(n_layers=3)
    torch.manual_seed(seed)
    m1 = VpMoE(cfg).to(DEV)
    m2 = copy.deepcopy(m1)
    f1, f2 = (FastMuonAdamW(build_optimizer(m, OptimConfig()), max_grad_norm=1.0, ns_chunk=64, ns_pack=2,
                            **{"stream_experts": False, **kw})  # the packed path unless the flag asks
              for m, kw in ((m1, reference or {}), (m2, flag)))
    p0 = [p.detach().clone() for p in m1.parameters()]
    grads = [[torch.randn_like(p) * scale for p in m1.parameters()] for scale in (0.05, 1e-4, 0.02)]

    eager_steps_vs_captured(m1, f1, m2, f2, grads)
    worst = []
    for (name, a), b, p in zip(m1.named_parameters(), m2.parameters(), p0):
        if a.ndim == 3:
            err = rel_err(b - p, a - p)
            worst.append((err, name))
            assert err < tol, (name, err)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    assert worst
    return max(worst)


def test_fast_optimizer_fused_update_matches_unfused(monkeypatch):
    """`fuse_update` (the packed experts' update in the last Newton-Schulz product's epilogue, a
    Triton kernel: vpmoe/train/ns_update.py) captured and replayed against the two-kernel step run
    eagerly: parameters equal to the bf16 product's rounding (the update's relative error)."""
    from vpmoe.train import ns_update
    calls, kernel = [], ns_update.qx_update
    monkeypatch.setattr(ns_update, "qx_update", lambda *a: calls.append(a[5]) or kernel(*a))
    worst = flag_captured_vs_eager(3, {"fuse_update": True}, 5e-3)
    assert set(calls) == {False, True}, calls  # the kernel ran (while captured too), both orientations
    print("fused update: worst relative error of the experts' update:", worst)


def test_fast_optimizer_stream_experts_captured_matches_eager(monkeypatch):
    """`stream_experts` (the experts' step as streaming kernels: vpmoe/train/expert_muon.py)
    captured and replayed against itself run eagerly (the same kernels: equal to the order of
    sums), the kernels run for both weight orientations; and against the packed torch path run
    eagerly within the two Newton-Schulz forms' half-precision error (the streaming one restarts
    from the small side)."""
    from vpmoe.train import expert_muon
    calls, kernel = [], expert_muon.momentum_gram
    monkeypatch.setattr(expert_muon, "momentum_gram", lambda *a: calls.append(a[5]) or kernel(*a))
    worst = flag_captured_vs_eager(3, {"stream_experts": True}, 1e-3, reference={"stream_experts": True})
    assert set(calls) == {False, True}, calls
    apart = flag_captured_vs_eager(3, {"stream_experts": True}, 5e-2)
    print("stream experts: captured vs eager, worst", worst, "; vs the packed path", apart)


@torch.no_grad()
def test_expert_muon_step_at_vpmoe_shapes():
    """`expert_muon.muon_step` at vpMoE's expert tensors (256 x 1024 x 128 and its transpose: the
    kernels' full 128-row tiles and 16 column tiles) against its torch reference functions, both
    against a float64 Newton-Schulz of the same U, and no less accurate than the packed torch path
    (which restarts from the big side); the kept copy equals the weight rounded."""
    from vpmoe.train import expert_muon
    from vpmoe.train.optim_fast import _Compiled, gram_newton_schulz_packed
    packed = _Compiled(gram_newton_schulz_packed, False)
    torch.manual_seed(4)
    coef, decay, step = (torch.tensor(v, device=DEV) for v in (0.8, 0.999, -0.01))
    for shape in ((256, 1024, 128), (256, 128, 1024)):
        g = torch.randn(shape, device=DEV).bfloat16()
        buf0, w0 = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV)
        runs = []
        for kernels in (True, False):
            buf, w, low = buf0.clone(), w0.clone(), torch.empty(shape, device=DEV, dtype=torch.bfloat16)
            expert_muon.muon_step(g, buf, w, low, coef, 0.95, True, decay, step, steps=5, kernels=kernels)
            runs.append((buf, (w - w0 * 0.999) / -0.01, w, low))
        (buf_k, upd_k, w_k, low_k), (buf_r, upd_r, _, _) = runs
        torch.testing.assert_close(buf_k, buf_r, rtol=1e-6, atol=1e-6)
        assert torch.equal(low_k, w_k.bfloat16())
        u64 = (g.double() * 0.8 + 0.95 * (buf0.double() * 0.95 + g.double() * 0.8)).bfloat16().double()
        o64 = ns_exact(u64)
        err_k, err_r, apart = rel_err(upd_k.double(), o64), rel_err(upd_r.double(), o64), rel_err(upd_k, upd_r)
        err_p = rel_err(packed([u64.bfloat16()], 5, kernel=True)[0].double(), o64)  # u64 holds bf16 values
        print(f"expert_muon {shape}: vs float64 {err_k:.2e} (its reference {err_r:.2e}, the packed path {err_p:.2e}); "
              f"kernels vs reference {apart:.2e}")
        assert apart < 5e-3 and err_k < 1.25 * err_r + 1e-3 and err_k < err_p, (apart, err_k, err_r, err_p)


@torch.no_grad()
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_momentum_gram_kernel_against_reference(buf_dtype):
    """`expert_muon.momentum_gram` at vpMoE's tensors, both orientations, fp32 and bf16 momentum
    (`BUF_BF16`), gradient-sized values, against `momentum_gram_reference` and float64. The kernel
    may fuse a multiply-add that torch rounds twice, so the momentum and U may differ from torch by
    a few fp32 units of the terms they sum (|mu buf| + |coef g|: where the sum cancels, that is many
    units of the result) plus one unit of their own dtype's rounding; R and the scale to fp32 sums."""
    from vpmoe.train import expert_muon
    torch.manual_seed(7)
    coef, mu, eps32 = torch.tensor(0.8, device=DEV), 0.95, 2.0 ** -24
    for shape in ((256, 1024, 128), (256, 128, 1024)):
        transposed = shape[1] > shape[2]
        g = (torch.randn(shape, device=DEV) * 1e-3).bfloat16()
        buf0 = (torch.randn(shape, device=DEV) * 1e-3).to(buf_dtype)
        buf, buf_r = buf0.clone(), buf0.clone()
        u, r, scale = expert_muon.momentum_gram(g, buf, coef, mu, True, transposed, 1e-7)
        u_r, r_r, scale_r = expert_muon.momentum_gram_reference(g, buf_r, coef, mu, True, transposed)
        g64, m64 = g.double() * 0.8, buf0.double() * mu + g.double() * 0.8
        terms_m = buf0.double().abs() * mu + g64.abs()
        terms_u = g64.abs() + mu * m64.abs() + mu * terms_m
        for got, ref, terms, exact in ((buf, buf_r, terms_m, m64), (u, u_r, terms_u, g64 + mu * m64)):
            own = 2.0 ** -8 if got.dtype == torch.bfloat16 else eps32  # half a unit of the stored dtype
            gap = (got.double() - ref.double()).abs()
            bound = 2 * own * ref.double().abs() + 4 * eps32 * terms
            print(f"momentum_gram {shape} {got.dtype}: differ {(got != ref).float().mean():.2e}, worst gap/bound "
                  f"{(gap / bound.clamp_min(1e-30)).max():.3f}")
            assert (gap <= bound).all(), (shape, got.dtype)
            if got.dtype == torch.bfloat16:  # fp32 units rarely move a bf16 rounding: nearly all equal
                assert (got != ref).float().mean() < 0.01, (shape, got.dtype)
            far = (got.double() - exact).abs() - (own * exact.abs() + 4 * eps32 * terms)
            assert (far <= 0).all(), (shape, got.dtype)  # within its dtype's rounding of the float64 value
        torch.testing.assert_close(r, r_r, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scale, scale_r, rtol=1e-5, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("programs", [16, 100])
def test_gram_chain_shared_programs_match_one_per_matrix(programs, monkeypatch):
    """`gram_chain` with fewer programs than matrices (`expert_muon.CONFIGS["chain"]`, each program
    taking its share in turn; 100 leaves a remainder over 256) gives the same bits as one program
    per matrix, at vpMoE's 256 x 128 x 128 Gram matrices."""
    from vpmoe.train import expert_muon
    from vpmoe.train.optim import NS_COEFFS
    torch.manual_seed(5)
    x = torch.randn(256, 128, 1024, device=DEV)
    r0 = x @ x.mT
    r0 = r0 / r0.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    scale = torch.rand(256, device=DEV) + 0.5
    per_matrix = expert_muon.gram_chain(r0, scale, 2, 3, *NS_COEFFS)
    monkeypatch.setitem(expert_muon.CONFIGS, "chain", (programs,))
    shared = expert_muon.gram_chain(r0, scale, 2, 3, *NS_COEFFS)
    assert all(torch.equal(p, q) for p, q in zip(per_matrix, shared))


def test_fast_optimizer_gram_kernel_matches_torch_path(monkeypatch):
    """`gram_kernel` (each restart segment of the packed experts' Gram-side iteration as one Triton
    kernel; the default) captured and replayed against the torch path (`gram_kernel=False`) run
    eagerly: the experts' updates equal to the fp16 roundings, the kernel run for both segments."""
    from vpmoe.train import ns_gram
    calls, kernel = [], ns_gram.gram_segment
    monkeypatch.setattr(ns_gram, "gram_segment", lambda r, steps, *abc: calls.append(steps) or kernel(r, steps, *abc))
    worst = flag_captured_vs_eager(4, {}, 2e-2, reference={"gram_kernel": False})
    assert set(calls) == {2, 3}, calls
    print("gram kernel: worst relative difference of the experts' update:", worst)


def carried_bound(bound, beta, new, old, term):
    """How far two passes' bf16-stored moment may be apart after one more step, per element: beta x the
    bound carried from the step before + one bf16 step of the new moment (at most 2^-7 of it: a rounding
    to the other neighbour) + a few fp32 ulps of the recurrence's terms (fp32 arithmetic in another
    order). `old`: the moment before the step; `term`: what the step adds before (1 - beta)."""
    return beta * bound + 2 ** -7 * new.abs() + 2 ** -20 * (beta * old.abs() + (1 - beta) * term)


def assert_within_bounds(got, want, bound, name):
    gap = (got.float() - want.float()).abs()
    print(f"{name}: {int((gap > 0).sum())} of {gap.numel()} differ; worst gap / bound "
          f"{float((gap / bound.clamp_min(1e-30)).max()):.3g}")
    assert bool((gap <= bound).all()), f"{name}: {int((gap > bound).sum())} elements past the bound"


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_adamw_from_rows_compiled_matches_dense(moments):
    """The embedding's AdamW from its gradient as rows (`_adamw_rows_update`, compiled: the gather
    inside the update's pass) against the compiled dense update (`_adamw_update`) on the [V, d]
    gradient the rows stand for (and which is the lookup's, to rounding), at a size that takes
    the big-tensor path (`ADAMW_ALONE`), tokens repeated: three steps, parameters and state within
    fp32 rounding; with bf16 moments (the default) the moments within `carried_bound` and the
    weights within what a moment one bf16 step apart moves."""
    from vpmoe.model.fast import embedding_rows
    from vpmoe.train.optim_fast import ADAMW_ALONE, _adamw_rows_update, _adamw_update

    torch.manual_seed(5)
    V, d = 8192, 1024
    assert V * d >= ADAMW_ALONE
    dense_fn = torch.compile(_adamw_update, dynamic=False)
    rows_fn = torch.compile(_adamw_rows_update, dynamic=False)
    w0 = torch.randn(V, d, device=DEV)
    runs = [[w0.clone(), torch.zeros_like(w0, dtype=moments), torch.zeros_like(w0, dtype=moments)] for _ in range(2)]
    bounds = [torch.zeros_like(w0), torch.zeros_like(w0)]
    for step in range(1, 4):
        tokens = torch.randint(0, 3000, (2, 2048), device=DEV)
        g_out = torch.randn(2, 2048, d, device=DEV) * 1e-2
        rowmap, rows = embedding_rows(tokens, g_out, V)
        # the very same gradient, dense (the rows against the lookup's own backward: CPU, float64,
        # tests/test_embed_rows.py): atomics' sums in another order could flip a near-zero
        # element's sign, which AdamW's first steps turn into a whole lr of difference
        hit = rowmap >= 0
        dense = torch.zeros(V, d, device=DEV)
        dense[hit] = rows[rowmap[hit]]
        torch.testing.assert_close(dense, torch.zeros(V, d, device=DEV).index_add_(0, tokens.reshape(-1),
                                                                                   g_out.reshape(-1, d)),
                                   rtol=1e-5, atol=1e-7)
        t, lr, coef = torch.tensor(float(step), device=DEV), torch.tensor(1e-3, device=DEV), torch.tensor(0.8, device=DEV)
        old = [runs[0][1].float(), runs[0][2].float()]
        dense_fn(runs[0][0], dense, runs[0][1], runs[0][2], t, lr, coef, 0.9, 0.95, 0.1, 1e-8)
        rows_fn(runs[1][0], rowmap, rows, runs[1][1], runs[1][2], t, lr, coef, 0.9, 0.95, 0.1, 1e-8)
        gc = (dense * coef).abs()
        bounds = [carried_bound(bounds[0], 0.9, runs[0][1].float(), old[0], gc),
                  carried_bound(bounds[1], 0.95, runs[0][2].float(), old[1], gc * gc)]
    if moments == torch.float32:
        for a, b, name in zip(*runs, ("weight", "exp_avg", "exp_avg_sq")):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    else:
        assert runs[1][1].dtype == runs[1][2].dtype == torch.bfloat16
        torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-3 / 64)
        for i, name in ((1, "exp_avg"), (2, "exp_avg_sq")):
            assert_within_bounds(runs[1][i], runs[0][i], bounds[i - 1], name)
    assert not torch.equal(runs[1][0], w0)


def test_adamw_bf16_moments_compiled_matches_reference():
    """`adamw_moments_dtype = bfloat16` on the GPU: the compiled big-tensor update (`_adamw_update`,
    one fused pass, as the embedding and head take it) against `MuonAdamW`'s eager AdamW with the
    same stored dtype, over three steps with a clip coefficient: the stored moments bf16 and each
    within a bound carried through the recurrence (the fused pass's fp32 arithmetic can round a
    moment to the other bf16 neighbour, and a moment one step apart stays apart, times beta, in the
    next step; where the next step's terms cancel, that is far more than 2^-7 of the new moment: a
    relative tolerance failed on an H100), the weights within what such a step moves."""
    from vpmoe.train.optim import MuonAdamW
    from vpmoe.train.optim_fast import ADAMW_ALONE, _adamw_update

    torch.manual_seed(6)
    V, d = 8192, 1024
    assert V * d >= ADAMW_ALONE
    fn = torch.compile(_adamw_update, dynamic=False)
    w0 = torch.randn(V, d, device=DEV)
    ref = torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [ref], "kind": "adamw", "lr": 1e-3, "base_lr": 1e-3, "weight_decay": 0.1,
                      "betas": (0.9, 0.95), "eps": 1e-8, "state_dtype": "bfloat16"}])
    w, m, v = w0.clone(), torch.zeros(V, d, device=DEV, dtype=torch.bfloat16), torch.zeros(V, d, device=DEV,
                                                                                          dtype=torch.bfloat16)
    coef = torch.tensor(0.8, device=DEV)
    # per element, how far the fused pass's moments may be from the reference's (`carried_bound`). On the CPU
    # (1024 x 1024) the worst gap is 0.57 of its bound; with beta1 0.895 in the fused pass, 86% of the elements
    # are past it
    bounds = {"exp_avg": torch.zeros(V, d, device=DEV), "exp_avg_sq": torch.zeros(V, d, device=DEV)}
    for step in range(1, 4):
        g = torch.randn(V, d, device=DEV) * 1e-2
        ref.grad = g * coef
        before = {k: t.float().clone() for k, t in opt.state[ref].items() if k in bounds}
        opt.step()
        fn(w, g, m, v, torch.tensor(float(step), device=DEV), torch.tensor(1e-3, device=DEV), coef, 0.9, 0.95, 0.1,
           1e-8)
        gc = (g * coef).abs()
        for name, beta, term in (("exp_avg", 0.9, gc), ("exp_avg_sq", 0.95, gc * gc)):
            new = opt.state[ref][name].float()
            bounds[name] = carried_bound(bounds[name], beta, new, before.get(name, torch.zeros_like(new)), term)
    state = opt.state[ref]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # a moment one bf16 step apart moves that element's update by ~2^-8 of lr: well under lr / 64
    torch.testing.assert_close(w, ref.detach(), rtol=1e-5, atol=1e-3 / 64)
    for name, b in (("exp_avg", m), ("exp_avg_sq", v)):
        assert_within_bounds(b, state[name], bounds[name], name)
    assert not torch.equal(w, w0)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (128, 1024)])
def test_matrices_bf16_momentum_compiled_matches_eager(shape):
    """The 2-D matrices' Muon step (`optim_fast._muon_matrices`, its bf16 momentum stored after it by
    `_store_momentum`) compiled against itself eager on the GPU, two steps, with bf16 stored
    momentum: the momentum within one bf16 step and the weights' change no further from eager than
    the same comparison with fp32 momentum (bf16 Newton-Schulz rounds differently fused) plus a
    little. Written after the whole-step test failed with bf16 momentum (2026-12-07): the generated
    code then applied the recurrence twice in the update when the store was inside the graph. Not
    yet run on a GPU."""
    from vpmoe.train.optim_fast import _muon_matrices, _store_momentum

    def run(fn, buf_dtype):
        g = torch.Generator(device=DEV).manual_seed(0)
        ps = [torch.randn(shape, device=DEV, generator=g) for _ in range(3)]
        bufs = [torch.zeros(shape, device=DEV, dtype=buf_dtype) for _ in range(3)]
        coef, decay, step = (torch.tensor(v, device=DEV) for v in (0.3, 0.999, -0.01))
        w0 = [p.clone() for p in ps]
        for k in range(2):
            # gradients as large as the momentum: the update's mix of the two is what a wrong recurrence moves
            grads = [torch.randn(shape, device=DEV, generator=g) * 0.05 for _ in range(3)]
            _store_momentum(bufs, fn(ps, grads, bufs, coef, 0.95, True, decay, step, 5, "gram", torch.bfloat16))
        return [p - w for p, w in zip(ps, w0)], bufs

    errs = {}
    for buf_dtype in (torch.float32, torch.bfloat16):
        eager = run(_muon_matrices, buf_dtype)
        compiled = run(torch.compile(_muon_matrices, dynamic=False), buf_dtype)
        torch._dynamo.reset()
        errs[buf_dtype] = max(rel_err(c, e) for c, e in zip(compiled[0], eager[0]))
        for c, e in zip(compiled[1], eager[1]):
            torch.testing.assert_close(c.float(), e.float(), rtol=2 ** -7, atol=1e-12)
    print("compiled vs eager, weight change rel err by momentum dtype:", errs)
    assert errs[torch.bfloat16] <= 1.5 * errs[torch.float32] + 1e-3, errs


def test_muon_pre_bf16_momentum_compiled_matches_eager():
    """`optim_fast._muon_pre` (the chunked and packed expert paths' momentum; it stores a bf16
    momentum inside its compiled graph, the pattern that went wrong in `_muon_matrices`) compiled
    against eager on the GPU, two steps: the stored momentum within one bf16 step, the returned
    Nesterov update within bf16 rounding of eager's."""
    from vpmoe.train.optim_fast import _muon_pre

    g = torch.Generator(device=DEV).manual_seed(1)
    grads = [torch.randn(8, 128, 1024, device=DEV, generator=g) * s for s in (0.05, 1e-4)]
    coef = torch.tensor(0.3, device=DEV)
    outs = []
    for fn in (_muon_pre, torch.compile(_muon_pre, dynamic=False)):
        buf = torch.zeros(8, 128, 1024, device=DEV, dtype=torch.bfloat16)
        us = [fn(gr, buf, coef, 0.95, True, torch.bfloat16) for gr in grads]
        outs.append((us[-1], buf))
    torch.testing.assert_close(outs[1][1].float(), outs[0][1].float(), rtol=2 ** -7, atol=1e-12)
    torch.testing.assert_close(outs[1][0].float(), outs[0][0].float(), rtol=2 ** -7, atol=1e-12)

"""The experts' Muon step as streaming kernels (vpmoe/train/expert_muon.py) against the torch path
it replaces and float64, on the CPU through the Triton interpreter (each check in a fresh process,
see tests/triton_interpreter.py). The GPU runs it compiled:
tests/gpu/test_gpu_optimizer.py::test_fast_optimizer_stream_experts_matches_packed."""
import copy

import pytest
import torch

from tests.triton_interpreter import run_in_interpreter
from vpmoe.train.ns_gram import gram_segment_reference
from vpmoe.train.optim import NS_COEFFS, OptimConfig, build_optimizer, newton_schulz

SEED = 0  # the token ids of the optimizer comparisons (the model's weights have their own seed)
BF16_ULP = 2.0 ** -7  # one bf16 ulp, relative to the value (8 significant bits)


def _within_one_bf16_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """The same bf16 rounding of fp32 sums taken in another order: at most one ulp apart, and
    mostly bit-equal (a missing rounding or a wrong operand leaves almost none equal)."""
    diff = (got.double() - ref.double()).abs()
    assert (diff <= BF16_ULP * ref.double().abs() + 1e-30).all(), diff.max()
    assert (got == ref).float().mean() > 0.9, (got == ref).float().mean()


def check_kernels_against_reference_and_float64() -> None:
    """momentum_gram at shapes that leave partial tiles (m = 24 in a 32-row tile, n = 40 in
    16-column tiles), both weight orientations, fp32 and bf16 momentum, bf16 and fp32 gradients,
    with and without Nesterov: every output against the torch path and R against float64. Then
    gram_chain (n = 128 and a padded n = 40, with and without the restart) against its torch
    reference and against float64, and with fewer programs than matrices against one per matrix;
    and qx_update with Q's low part."""
    from vpmoe.train import expert_muon as X
    from vpmoe.train import ns_update

    gen = torch.Generator().manual_seed(11)
    b, m, n, mu = 3, 24, 40, 0.95
    coef = torch.tensor(0.7)
    for transposed, buf_dtype, g_dtype, nesterov in ((False, torch.float32, torch.bfloat16, True),
                                                    (True, torch.float32, torch.float32, True),
                                                    (True, torch.bfloat16, torch.bfloat16, False)):
        shape = (b, n, m) if transposed else (b, m, n)
        g = (torch.randn(shape, generator=gen) * torch.logspace(-2, 1, shape[-1])).to(g_dtype)
        buf0 = torch.randn(shape, generator=gen).to(buf_dtype)
        buf_k, buf_r = buf0.clone(), buf0.clone()
        u, r, scale = X.momentum_gram(g, buf_k, coef, mu, nesterov, transposed, 1e-7)
        u_r, r_r, scale_r = X.momentum_gram_reference(g, buf_r, coef, mu, nesterov, transposed)
        assert u.shape == g.shape and u.dtype == torch.bfloat16 and u.is_contiguous()
        assert r.dtype == torch.float32 and r.shape == (b, m, m)
        assert torch.equal(buf_k, buf_r), (buf_k.float() - buf_r.float()).abs().max()  # the same fp32 ops
        assert not torch.equal(buf_k, buf0)
        _within_one_bf16_ulp(u, u_r)
        torch.testing.assert_close(scale, scale_r, rtol=1e-5, atol=0)
        torch.testing.assert_close(r, r_r, rtol=1e-5, atol=1e-6)  # fp32 sums in another order
        uo = (u.mT if transposed else u).double()
        s64 = 1.0 / uo.square().sum((1, 2)).sqrt()
        r64 = uo @ uo.mT * s64[:, None, None] ** 2
        torch.testing.assert_close(r.double(), r64, rtol=1e-5, atol=1e-6)
        assert (r64.diagonal(dim1=1, dim2=2).sum(-1) - 1).abs().max() < 1e-9  # normalised: trace 1
    # operands it does not take are refused by name
    with pytest.raises(ValueError, match="momentum_gram: wants"):
        X.momentum_gram(torch.zeros(b, m, n), torch.zeros(b, m, n + 1), coef, mu, True, False, 1e-7)

    a, b_, c = NS_COEFFS
    for side, steps1, steps2 in ((128, 2, 3), (40, 2, 3), (40, 5, 0)):
        x = torch.randn(2, side, 4 * side, generator=gen, dtype=torch.float64) * torch.logspace(
            -1.5, 0.5, side, dtype=torch.float64)[:, None]
        r0 = x @ x.mT
        scale64 = 1 / r0.diagonal(dim1=1, dim2=2).sum(-1).sqrt()
        r0n = (r0 * scale64[:, None, None] ** 2).float()
        scale = (scale64 * 3).float()  # any per-matrix scale: Q comes back multiplied by it
        hi, lo = X.gram_chain(r0n, scale, steps1, steps2, a, b_, c)
        hi_r, lo_r = X.gram_chain_reference(r0n, scale, steps1, steps2, a, b_, c)
        assert hi.dtype == lo.dtype == torch.bfloat16 and hi.shape == r0n.shape
        q, q_r = hi.double() + lo.double(), hi_r.double() + lo_r.double()
        assert (lo.double().abs() <= 2.0 ** -8 * hi.double().abs() + 1e-30).all()  # lo is hi's rounding rest
        # float64: the same five quintic steps on R0 (no roundings), times the scale
        q64 = gram_segment_reference(r0n.double(), steps1 + steps2, a, b_, c) * scale.double()[:, None, None]
        err, err_r = ((q - q64).norm() / q64.norm()).item(), ((q_r - q64).norm() / q64.norm()).item()
        # fp16 iterations with the same rounding points, sums in other orders
        assert err <= 1.5 * err_r + 1e-4 and err < 2e-2, (side, steps1, err, err_r)
        assert ((q - q_r).norm() / q_r.norm()).item() < 1e-2
        print(f"gram_chain n={side} steps {steps1}+{steps2}: vs float64 {err:.2e} (reference {err_r:.2e})")
    with pytest.raises(ValueError, match="gram_chain: wants"):
        X.gram_chain(r0n.half(), scale, 2, 3, a, b_, c)
    # fewer programs than matrices (CONFIGS["chain"]): each takes its share in turn, the same bits
    x = torch.randn(5, 40, 160, generator=gen, dtype=torch.float64)
    r5 = x @ x.mT
    r5 = (r5 / r5.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]).float()
    s5 = torch.rand(5, generator=gen) + 0.5
    per_matrix = X.gram_chain(r5, s5, 2, 3, a, b_, c)
    try:
        X.CONFIGS["chain"] = (2,)
        shared = X.gram_chain(r5, s5, 2, 3, a, b_, c)
    finally:
        X.CONFIGS["chain"] = X.DEFAULT_CONFIGS["chain"]
    assert all(torch.equal(p, q) for p, q in zip(per_matrix, shared))
    ref5 = X.gram_chain_reference(r5, s5, 2, 3, a, b_, c)
    assert ((per_matrix[0].double() - ref5[0].double()).norm() / ref5[0].double().norm()).item() < 1e-2

    # the update with Q's low part: Q_hi X + Q_lo X in one fp32 sum, against the torch reference
    q_hi = (torch.randn(3, 24, 24, generator=gen) * 0.3).bfloat16()
    q_lo = (q_hi.float() * torch.rand(3, 24, 24, generator=gen) * 2.0 ** -9).bfloat16()
    xo = torch.randn(3, 24, 40, generator=gen).bfloat16()
    decay, step = torch.tensor(0.99), torch.tensor(-0.02)
    for transposed in (False, True):
        w0 = torch.randn((3, 40, 24) if transposed else (3, 24, 40), generator=gen)
        got, ref, low = w0.clone(), w0.clone(), torch.empty(w0.shape, dtype=torch.bfloat16)
        ns_update.qx_update(got, q_hi, xo, decay, step, transposed, low, q_lo)
        ns_update.qx_update_reference(ref, q_hi, xo, decay, step, transposed, q_lo)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.equal(low, got.bfloat16())
        without = w0.clone()
        ns_update.qx_update(without, q_hi, xo, decay, step, transposed, None, None)
        assert not torch.equal(without, got)  # the low part counted
    print("checked")


def check_muon_step_against_reference_and_float64() -> None:
    """`muon_step` (kernels) against `muon_step(kernels=False)` (the torch path's functions) and
    against float64: the orthogonalised update of a float64 Newton-Schulz of the same U, within
    the half-precision iteration's error; the momentum, weight and kept copy all written."""
    from vpmoe.train import expert_muon as X

    gen = torch.Generator().manual_seed(5)
    b, m, n, mu = 2, 16, 64, 0.9
    coef, decay, step = torch.tensor(0.5), torch.tensor(0.995), torch.tensor(-0.05)
    for transposed in (False, True):
        shape = (b, n, m) if transposed else (b, m, n)
        g = torch.randn(shape, generator=gen).bfloat16()
        buf0, w0 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        got = [buf0.clone(), w0.clone(), torch.empty(shape, dtype=torch.bfloat16)]
        ref = [buf0.clone(), w0.clone(), torch.empty(shape, dtype=torch.bfloat16)]
        X.muon_step(g, got[0], got[1], got[2], coef, mu, True, decay, step, steps=5)
        X.muon_step(g, ref[0], ref[1], ref[2], coef, mu, True, decay, step, steps=5, kernels=False)
        assert torch.equal(got[0], ref[0])
        upd, upd_ref = (got[1] - w0 * 0.995) / -0.05, (ref[1] - w0 * 0.995) / -0.05
        # the iteration's fp16 and bf16 roundings, summed in other orders: a few ulps of bf16
        assert (upd - upd_ref).abs().max() < 0.02 * upd_ref.abs().max(), (upd - upd_ref).abs().max()
        assert torch.equal(got[2], got[1].bfloat16())
        # float64: the same U (bf16) through the float64 quintic iteration
        u64 = (g.double() * 0.5 + mu * (buf0.double() * mu + g.double() * 0.5)).bfloat16().double()
        o64 = newton_schulz(u64, 5, dtype=torch.float64)
        rel = (upd.double() - o64).norm() / o64.norm()
        assert rel < 1.5e-2, rel  # 6e-3 and 8e-3 here; on the H200 the torch path read 4.5e-3 (Gaussian)
    print("checked")


def _counting_kernel_calls():
    """Patch `expert_muon.momentum_gram` (a fresh process: nothing to restore) to record each call's
    weight orientation; returns the list it fills."""
    from vpmoe.train import expert_muon
    calls, kernel = [], expert_muon.momentum_gram

    def counted(g, buf, coef, mu, nesterov, transposed, eps):
        calls.append(transposed)
        return kernel(g, buf, coef, mu, nesterov, transposed, eps)
    expert_muon.momentum_gram = counted
    return calls


def _update_apart(a: torch.Tensor, b: torch.Tensor, before: torch.Tensor) -> float:
    """Relative distance between two updates of the same parameter."""
    return ((a - b).norm() / (b - before).norm()).item()


def check_optimizer_stream_experts_matches_packed() -> None:
    """FastMuonAdamW with `stream_experts` against the packed torch path, both with bf16
    Newton-Schulz (the GPU's dtype) on a small model, 3 clipped steps with kept weight copies:
    every other parameter equal to rounding; the experts' updates within the two Newton-Schulz
    forms' half-precision error of each other (the streaming one restarts from the small side); the
    copies the weights rounded, and the kernels called for both weight orientations."""
    import functools

    from tests.test_model import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim_fast import FastMuonAdamW, gram_newton_schulz_packed

    calls = _counting_kernel_calls()
    cfg = small()
    m1 = randomize(VpMoE(cfg))
    m2, m0 = copy.deepcopy(m1), copy.deepcopy(m1)
    opts = []
    for model, stream in ((m1, False), (m2, True)):
        fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.2, ns_pack=2,
                             stream_experts=stream)
        fast.ns_dtype = torch.bfloat16
        fast.weight_copies = {id(p): p.detach().bfloat16() for p in model.parameters() if p.ndim == 3}
        opts.append(fast)
    # the packed path's n x n iteration in fp16, as on CUDA (the CPU's default is fp32)
    opts[0]._ns_packed.fn = functools.partial(gram_newton_schulz_packed, small_dtype=torch.float16)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(SEED))
    for _ in range(3):  # both take model 1's gradients, so routing flips cannot compound the difference
        out = m1(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        for a, b in zip(m1.parameters(), m2.parameters()):
            b.grad = a.grad.clone()
        for model, fast in zip((m1, m2), opts):
            fast.step()
            model.zero_grad()
    experts = []
    for (name, a), b, p0 in zip(m1.named_parameters(), m2.parameters(), m0.parameters()):
        if a.ndim == 3:
            experts.append(_update_apart(b.detach(), a.detach(), p0.detach()))
            # 8 x 32 matrices: each form's fp16 error is larger than at vpMoE's (up to ~3e-2 apart)
            assert experts[-1] < 5e-2, (name, experts[-1])
            assert torch.equal(opts[1].weight_copies[id(b)], b.detach().bfloat16()), name
            assert torch.equal(opts[0].weight_copies[id(a)], a.detach().bfloat16()), name
        else:  # the same code: sums in other orders at most
            torch.testing.assert_close(b, a, rtol=0, atol=2e-5, msg=name)
    assert len(experts) >= 3 and max(experts) > 1e-4, experts  # the two forms differ, a little
    assert set(calls) == {False, True}, calls  # the kernels ran, for wide and transposed weights
    print("checked", SEED, max(experts))


def check_stream_experts_takes_the_holders_bf16_gradients() -> None:
    """The graphed step's gradients at one micro-batch: FastBody's holders take the experts' weight
    gradients in bf16 from the gathered kernel (`graphed.LOW_GRADS`). The streaming step given them
    equals the streaming step given the same values as fp32 gradients (the kernel reads either dtype
    into the same fp32 math; the clipping norm's sums differ by ~1e-6), and the packed step's within their two Newton-Schulz
    forms' error; bf16 against the masters' fp32 gradients of the same backward moves some update by
    a large fraction (clipped first steps: why the graphed-step GPU test keeps `LOW_GRADS` off,
    2026-12-05). Expert matrices 8 x 32, so both paths iterate on the Gram side."""
    import functools

    from tests.test_low_grads import _backward, _bodies
    from vpmoe.train.optim_fast import FastMuonAdamW, gram_newton_schulz_packed

    calls = _counting_kernel_calls()
    cfg, ((model32, body32, _), (model16, body16, _)) = _bodies(False, copies=False, expert_ffn=8)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(SEED))
    doc = torch.zeros(2, 24, dtype=torch.long)
    _backward(model32, body32, tokens, doc)
    _backward(model16, body16, tokens, doc)
    updates = {}
    for grads_as, stream in (("fp32", True), ("bf16", True), ("bf16_as_fp32", True), ("bf16", False)):
        source = model32 if grads_as == "fp32" else model16
        given = {} if grads_as == "fp32" else body16.low_grads()
        assert len(given) == (0 if grads_as == "fp32" else 2 * len(model16.moe_layers()))
        if grads_as == "bf16_as_fp32":
            given = {k: v.float() for k, v in given.items()}
        model = copy.deepcopy(source)
        for p, q in zip(model.parameters(), source.parameters()):
            p.grad = None if q.grad is None else q.grad.clone()
        grads = {id(p): given[id(q)] for p, q in zip(model.parameters(), source.parameters()) if id(q) in given}
        opt = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=1.0, compile=False,
                            ns_pack=2, stream_experts=stream)
        opt.ns_dtype = torch.bfloat16
        opt._ns_packed.fn = functools.partial(gram_newton_schulz_packed, small_dtype=torch.float16)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(grads=grads)
        updates[grads_as, stream] = [p.detach() - b for p, b in zip(model.parameters(), before)]
    assert set(calls) == {False, True}, calls  # the streaming kernels ran, both orientations
    # the same values in either dtype: equal up to the clipping norm's sums (~1e-6 here)
    assert all(((a - b).norm() <= 1e-5 * b.norm()) for a, b in zip(updates["bf16", True], updates["bf16_as_fp32", True]))
    for (name, p), a, b in zip(model16.named_parameters(), updates["bf16", True], updates["bf16", False]):
        if p.ndim == 3:
            # 8 x 32 matrices: each form's fp16 iteration error is larger than at vpMoE's (1.5-3.1e-2 apart here)
            assert ((a - b).norm() / b.norm()).item() < 5e-2, name
        else:
            assert torch.equal(a, b), name
    apart = max(((a - b).norm() / b.norm()).item() for a, b in zip(updates["bf16", True], updates["fp32", True]))
    assert apart > 1e-2, apart
    print("checked")


def test_expert_muon_kernels_against_reference_and_float64():
    run_in_interpreter("tests.test_expert_muon", "check_kernels_against_reference_and_float64", timeout=600)


def test_expert_muon_step_against_reference_and_float64():
    run_in_interpreter("tests.test_expert_muon", "check_muon_step_against_reference_and_float64", timeout=600)


def test_stream_experts_takes_the_holders_bf16_gradients():
    run_in_interpreter("tests.test_expert_muon", "check_stream_experts_takes_the_holders_bf16_gradients", timeout=600)


def test_optimizer_stream_experts_matches_packed_in_the_interpreter():
    run_in_interpreter("tests.test_expert_muon", "check_optimizer_stream_experts_matches_packed", timeout=600)


def test_stream_experts_follows_the_module_setting_and_falls_back_on_the_cpu(monkeypatch):
    """`stream_experts=None` takes `optim_fast.STREAM_EXPERTS`; on the CPU (no Triton interpreter)
    the kernels do not apply, so the expert tensors take the packed torch path and the step runs."""
    from tests.test_model import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train import optim_fast
    from vpmoe.train.optim_fast import FastMuonAdamW

    model = randomize(VpMoE(small()))
    for setting in (False, True):
        monkeypatch.setattr(optim_fast, "STREAM_EXPERTS", setting)
        assert FastMuonAdamW(build_optimizer(model, OptimConfig())).stream_experts is setting
    fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), ns_pack=2, stream_experts=True)
    experts = [p for p in model.parameters() if p.ndim == 3]
    assert fast.stream_experts and experts
    assert not any(fast._streams(p) for p in experts) and all(fast._packs(p) for p in experts)
    before = [p.detach().clone() for p in experts]
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    fast.step()
    assert all((p != b).float().mean() > 0.99 for p, b in zip(experts, before))


def test_muon_step_refuses_two_restarts_by_name():
    """The small-side chain takes one restart; a second in `restart_at` is refused, not ignored."""
    from vpmoe.train import expert_muon as X
    shape = (2, 8, 32)
    g, buf, w = torch.randn(shape).bfloat16(), torch.randn(shape), torch.randn(shape)
    with pytest.raises(ValueError, match="at most one restart, got \\[1, 3\\]"):
        X.muon_step(g, buf, w, None, torch.tensor(1.0), 0.9, True, torch.tensor(1.0), torch.tensor(-0.01), 5,
                    restart_at=(1, 3), kernels=False)
    w0 = w.clone()
    X.muon_step(g, buf, w, None, torch.tensor(1.0), 0.9, True, torch.tensor(1.0), torch.tensor(-0.01), 5,
                restart_at=(), kernels=False)  # no restart: one five-step segment
    assert (w != w0).float().mean() > 0.99


def test_small_side_restart_is_closer_to_float64_than_the_big_side():
    """bench/restart_accuracy.py's comparison, two matrices per spectrum: the streaming path's
    reference functions (the restart from the small side, a near-fp32 Q) against the packed path's
    big-side restart, both against a float64 iteration of the same bf16 U."""
    from bench.restart_accuracy import small_side, spectrum
    from vpmoe.train.optim_fast import gram_newton_schulz

    gen = torch.Generator().manual_seed(1)
    for kind, factor in (("gaussian", 0.8), ("rank 4 + 1e-3", 0.5)):
        u = spectrum(kind, 2, gen).bfloat16()
        exact = newton_schulz(u.double(), 5, dtype=torch.float64)
        big = ((gram_newton_schulz(u, 5, small_dtype=torch.float16).double() - exact).norm() / exact.norm()).item()
        small = ((small_side(u).double() - exact).norm() / exact.norm()).item()
        assert small < factor * big and small < 2e-2, (kind, small, big)

"""The Muon update in the last Newton-Schulz product's epilogue (vpmoe/train/ns_update.py) against
the two-op path it replaces and float64, on the CPU through the Triton interpreter (each check in a
fresh process, see tests/triton_interpreter.py). The GPU runs it compiled:
tests/gpu/test_gpu_optimizer.py::test_fast_optimizer_fused_update_matches_unfused."""
import torch

from tests.triton_interpreter import run_in_interpreter


def check_kernel_against_reference_and_float64() -> None:
    """Shapes that leave partial row and column tiles (m = 24 in a 32-row tile, n = 40 in 16-column
    tiles), wide and transposed weights, a non-unit decay and a negative step, values over several
    magnitudes; every element of W is updated exactly once. Then the same with several column tiles
    per program (`UPDATE_CONFIG`, the last program's tiles partly past n) and an fp16 Q (rounded to
    bf16 in the kernel): bit-equal to one tile per program with Q cast by torch."""
    from vpmoe.train import ns_update

    g = torch.Generator().manual_seed(7)
    b, m, n = 3, 24, 40
    q = (torch.randn(b, m, m, generator=g) * 0.3).bfloat16()
    x = (torch.randn(b, m, n, generator=g) * torch.logspace(-2, 1, n)).bfloat16()
    decay, step = torch.tensor(0.99), torch.tensor(-0.02)
    for transposed in (False, True):
        w0 = torch.randn(b, n, m, generator=g) if transposed else torch.randn(b, m, n, generator=g)
        assert ns_update.applies(w0.device, x.dtype, w0.dtype, m)
        got, ref = w0.clone(), w0.clone()
        ns_update.qx_update(got, q, x, decay, step, transposed, None)
        ns_update.qx_update_reference(ref, q, x, decay, step, transposed)
        o64 = q.double() @ x.double()
        o64 = o64.mT if transposed else o64
        exact = w0.double() * 0.99 + o64 * -0.02  # before the product's bf16 rounding
        # the product is rounded to bf16 (half an ulp: 2^-9 relative) in both paths, one order of
        # summation apart: at most one bf16 ulp of the product apart, times |step|
        ulp = 2.0 ** -7 * o64.abs() * 0.02 + 1e-6 * w0.abs().double() + 1e-9
        assert ((got.double() - ref.double()).abs() <= ulp).all(), (got - ref).abs().max()
        # the same bf16 rounding and fp32 ops: nearly every element is bit-equal (an unrounded
        # product would leave almost none equal)
        assert (got == ref).float().mean() > 0.9, (got == ref).float().mean()
        assert ((got.double() - exact).abs() <= ulp / 2 + 1e-7).all(), (got.double() - exact).abs().max()
        assert (got != w0).float().mean() > 0.99  # every element moved
        assert (got - w0).abs().max() > 1e-3
    q16 = (torch.randn(b, m, m, generator=g) * 0.3).half()
    saved = ns_update.UPDATE_CONFIG
    for transposed in (False, True):
        w0 = torch.randn(b, n, m, generator=g) if transposed else torch.randn(b, m, n, generator=g)
        one, several = w0.clone(), w0.clone()
        low_one, low_several = (torch.empty(w0.shape, dtype=torch.bfloat16) for _ in range(2))
        ns_update.qx_update(one, q16.bfloat16(), x, decay, step, transposed, low_one)
        try:
            ns_update.UPDATE_CONFIG = (16, 2, 4, 3)  # 40 columns: tiles 0-1, then 2 and one wholly past n
            ns_update.qx_update(several, q16, x, decay, step, transposed, low_several)
        finally:
            ns_update.UPDATE_CONFIG = saved
        assert torch.equal(one, several) and torch.equal(low_one, low_several), transposed
        assert (one != w0).float().mean() > 0.99
        assert not torch.equal(q16.bfloat16().float(), q16.float())  # the fp16 Q needed rounding
    # operands it does not take are refused by name
    try:
        ns_update.qx_update(torch.zeros(b, m, n + 1), q, x, decay, step, False, None)
    except ValueError as e:
        assert "qx_update: wants" in str(e)
    else:
        raise AssertionError("a wrong W shape was accepted")
    print("checked")


def check_optimizer_fused_update_matches_unfused() -> None:
    """FastMuonAdamW with `fuse_update` (this kernel) against without it, both with bf16
    Newton-Schulz (the GPU's dtype) on a small model, 3 clipped steps: the same parameters to the
    bf16 product's rounding, and the kernel called for both weight orientations."""
    import copy

    from tests.test_kernels import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim import OptimConfig, build_optimizer
    from vpmoe.train.optim_fast import FastMuonAdamW

    from vpmoe.train import ns_update

    calls = []
    kernel = ns_update.qx_update

    def counted(w, q, x, decay, step, transposed, low=None):
        calls.append(transposed)
        return kernel(w, q, x, decay, step, transposed, low)
    ns_update.qx_update = counted  # a fresh process: nothing to restore

    cfg = small()
    m1 = randomize(VpMoE(cfg))
    m2 = copy.deepcopy(m1)
    opts = []
    for model, fuse in ((m1, False), (m2, True)):
        fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.2, ns_pack=2, fuse_update=fuse,
                             stream_experts=False)
        fast.ns_dtype = torch.bfloat16
        opts.append(fast)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    for _ in range(3):
        for model, fast in zip((m1, m2), opts):
            out = model(ids)
            (out.logits.square().mean() + out.aux_loss).backward()
            fast.step()
            model.zero_grad()
    experts = 0
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        experts += a.ndim == 3
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=name)
    assert experts >= 3
    assert set(calls) == {False, True}, calls  # the kernel ran, for wide and transposed weights
    print("checked")


def test_fused_update_kernel_against_reference_and_float64():
    run_in_interpreter("tests.test_ns_update", "check_kernel_against_reference_and_float64", timeout=600)


def test_optimizer_fused_update_matches_unfused_in_the_interpreter():
    run_in_interpreter("tests.test_ns_update", "check_optimizer_fused_update_matches_unfused", timeout=600)

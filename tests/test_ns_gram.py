"""The Gram-side Newton-Schulz segment kernel (vpmoe/train/ns_gram.py) against an emulation of the
torch path's roundings and against float64, on the CPU through the Triton interpreter (each check
in a fresh process, see tests/triton_interpreter.py); the torch path's segment decomposition
against the step-by-step iteration it replaced. The GPU runs the kernel compiled:
tests/gpu/test_gpu_optimizer.py::test_gram_segment_kernel_cuda_matches_torch_path."""
import torch

from tests.triton_interpreter import run_in_interpreter


def normalised_gram(batch: int, n: int, wide: int, seed: int) -> torch.Tensor:
    """R = X X^T / ||X||_F^2 for random X [batch, n, wide] with rows over several magnitudes (the
    optimizer's input to the segment: eigenvalues in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, wide, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.5, n,
                                                                                     dtype=torch.float64)[:, None]
    r = x @ x.mT
    return r / r.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]


def emulated_fp16_segment(r16: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """The CUDA torch path's arithmetic in float64 with its roundings spelled out: every product
    accumulated exactly (an fp32 sum differs from it by ~1e-7 relative), rounded to fp16 where the
    torch path writes fp16 (the polynomial's Z, Z@Q, Z@R, (ZR)@Z)."""
    def half(t):
        return t.to(torch.float16).double()

    r, q = r16.double(), None
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    for i in range(steps):
        z = half(r @ r * c + r * b + eye * a)
        q = z if q is None else half(z @ q)
        if i + 1 < steps:
            r = half(half(z @ r) @ z)
    return q


def check_kernel_against_emulation_and_float64() -> None:
    """n = 128 (vpMoE's experts) and n = 40 (a padded tile), segments of 2 and 3 steps (the
    optimizer's two segments): the kernel's fp16 Q sits within a few fp16 ulps of the emulated
    torch path, most elements bit-equal, and as close to the unrounded float64 product as it."""
    from vpmoe.train import ns_gram
    from vpmoe.train.optim import NS_COEFFS

    a, b, c = NS_COEFFS
    for n, steps, seed in ((128, 2, 0), (40, 3, 1)):
        r64 = normalised_gram(3, n, 4 * n, seed)
        r16 = r64.to(torch.float16)
        assert ns_gram.applies(r16)
        got = ns_gram.gram_segment(r16, steps, a, b, c)
        assert got.dtype == torch.float16 and got.shape == r16.shape
        emu = emulated_fp16_segment(r16, steps, a, b, c)
        exact = ns_gram.gram_segment_reference(r64, steps, a, b, c)  # float64 throughout
        scale = exact.abs().amax()
        diff = (got.double() - emu).abs()
        assert diff.max() <= 8 * 2.0 ** -11 * scale, (n, steps, diff.max().item(), scale.item())
        equal = (got.double() == emu).double().mean().item()
        assert equal > 0.5, (n, steps, equal)  # the same rounding points (an fp32 Q would match none)
        err_got = ((got.double() - exact).norm() / exact.norm()).item()
        err_emu = ((emu - exact).norm() / exact.norm()).item()
        assert err_got <= 1.5 * err_emu + 1e-5 and err_got < 5e-3, (n, steps, err_got, err_emu)
        assert (got.double() - r16.double()).abs().max() > 0.1  # it iterated
    # what it does not take is refused by name
    for bad in (torch.zeros(2, 8, 8), torch.zeros(2, 160, 160, dtype=torch.float16)):
        try:
            ns_gram.gram_segment(bad, 2, a, b, c)
        except ValueError as e:
            assert "gram_segment: wants" in str(e)
        else:
            raise AssertionError(f"gram_segment took {tuple(bad.shape)} {bad.dtype}")
    print("checked")


def check_optimizer_gram_kernel_matches_torch_path() -> None:
    """One clipped FastMuonAdamW step on a small model with bf16 Newton-Schulz, three ways: the
    n x n side in fp16 through the kernel (`gram_kernel`), in fp16 through torch (the GPU's
    dtypes), and in float64 (the yardstick). The kernel's expert updates are as close to the
    float64 side's as torch's are (both a few % off at these shapes), every other
    parameter is untouched by the flag (bit-equal), and the kernel ran for every packed segment."""
    import copy

    from tests.test_kernels import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train import ns_gram, optim_fast
    from vpmoe.train.optim import OptimConfig, build_optimizer
    from vpmoe.train.optim_fast import FastMuonAdamW

    calls = []
    kernel = ns_gram.gram_segment

    def counted(r, steps, a, b, c):
        calls.append((tuple(r.shape), steps))
        return kernel(r, steps, a, b, c)
    ns_gram.gram_segment = counted  # a fresh process: nothing to restore
    parts, small_side = optim_fast.gram_newton_schulz_parts, {}
    optim_fast.gram_newton_schulz_parts = lambda xs, steps, eps=1e-7, restart_at=(2,), small_dtype=None, \
        kernel=False: parts(xs, steps, eps, restart_at, small_side["dtype"], kernel)

    torch.manual_seed(0)
    cfg = small()
    m0 = randomize(VpMoE(cfg))
    ids = torch.randint(0, cfg.vocab_size, (4, 48))  # enough tokens per expert for full-rank gradients
    moved = {}
    for name, use, dtype in (("kernel", True, torch.float16), ("torch", False, torch.float16),
                             ("float64", False, torch.float64)):
        model = copy.deepcopy(m0)
        fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.2, ns_pack=2, gram_kernel=use,
                             stream_experts=False)
        fast.ns_dtype = torch.bfloat16
        small_side["dtype"] = dtype
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        fast.step()
        moved[name] = [(n, (p - p0).double()) for (n, p), p0 in zip(model.named_parameters(), m0.parameters())]
    experts = 0
    for (n, dk), (_, dt), (_, d64) in zip(moved["kernel"], moved["torch"], moved["float64"]):
        if dk.ndim != 3:
            assert torch.equal(dk, dt), n
            continue
        experts += 1
        # Newton-Schulz amplifies small singular values ~a^5-fold, so both fp16 sides land 2-8% from
        # the float64 one at these tiny shapes (seeds 0-2); the kernel must be no further off
        err_k, err_t = (dk - d64).norm().item(), (dt - d64).norm().item()
        assert d64.norm() > 0 and err_k <= 1.5 * err_t + 1e-3 * d64.norm().item(), (n, err_k, err_t)
    assert experts >= 3
    assert calls and {s for _, s in calls} == {2, 3}, calls  # both segments of every packed call
    assert sum(s == 2 for _, s in calls) == sum(s == 3 for _, s in calls)
    print("checked")


def test_gram_segment_kernel_against_emulation_and_float64():
    run_in_interpreter("tests.test_ns_gram", "check_kernel_against_emulation_and_float64", timeout=600)


def test_optimizer_gram_kernel_matches_torch_path_in_the_interpreter():
    run_in_interpreter("tests.test_ns_gram", "check_optimizer_gram_kernel_matches_torch_path", timeout=600)


def test_segments_equal_the_step_by_step_iteration():
    """`gram_newton_schulz_parts` runs the iteration as restart segments; in float64 its Q and X
    equal the step-by-step loop (restart before step k: X <- Q X, R recomputed) for any restarts,
    including a restart at 0 (ignored) and one past the last step (ignored)."""
    from vpmoe.train.optim import NS_COEFFS
    from vpmoe.train.optim_fast import gram_newton_schulz_parts

    a, b, c = NS_COEFFS
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 64, generator=g, dtype=torch.float64)
    for restart_at in ((), (2,), (1, 3), (0, 2, 9)):
        qs, xs, transposed = gram_newton_schulz_parts([x], 5, 1e-7, restart_at)
        assert not transposed
        # the step-by-step loop, written out
        r = x @ x.mT
        scale = 1.0 / (r.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt() + 1e-7)
        r, xw, q = r * scale[:, None, None] ** 2, x, None
        for i in range(5):
            if i in restart_at and q is not None:
                xw, scale, q = (q * scale[:, None, None]) @ xw, torch.ones_like(scale), None
                r = xw @ xw.mT
            z = a * torch.eye(16, dtype=torch.float64) + b * r + c * r @ r
            q = z if q is None else z @ q
            if i + 1 < 5 and (i + 1) not in restart_at:
                r = z @ r @ z
        torch.testing.assert_close(qs[0], q * scale[:, None, None], rtol=0, atol=1e-12)
        torch.testing.assert_close(xs[0], xw, rtol=0, atol=1e-12)

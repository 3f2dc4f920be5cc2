"""The fused loss's row kernels (vpmoe/kd/row_kernels.py) against float64, on the CPU through the
Triton interpreter (TRITON_INTERPRET=1 must be set before the kernels are defined: each check runs
in a fresh process), and the fused loss with them against the loss without them. The GPU runs the
same kernels compiled: tests/gpu/test_gpu_row_kernels.py."""
import torch

from tests.triton_interpreter import run_in_interpreter


def _in_interpreter(check: str) -> None:
    run_in_interpreter("tests.test_row_kernels", check, timeout=600)


def random_logits(C: int, V: int, gen, n_inf: int = 0, row_pad: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Logits with a spread like a trained head's (std 4), n_inf entries per row at -inf (the
    sparse loss's known ids), a row stride wider than the row when row_pad > 0."""
    z = 4 * torch.randn(C, V + row_pad, generator=gen) + torch.randn(C, 1, generator=gen)
    for c in range(C):
        z[c, torch.randperm(V, generator=gen)[:n_inf]] = float("-inf")
    return z.to(dtype)[:, :V]


def check_kernels(block: int = 0, segment_blocks: int = 0) -> None:
    """row_lse and rest_grad_ vs float64: fp32 and bf16 storage, V not a multiple of the block,
    -inf entries, a padded row stride; rest_grad_ writes in place and leaves the padding alone."""
    from vpmoe.kd import row_kernels as RK

    assert RK.interpreting()
    if block:  # several blocks and segments per row, the last ones partial
        RK.BLOCK, RK.SEGMENT_BLOCKS = block, segment_blocks
    gen = torch.Generator().manual_seed(5)
    for C, V, n_inf, pad in ((3, 1000, 0, 0), (5, 777, 9, 16), (1, 64, 63, 0)):
        for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
            z = random_logits(C, V, gen, n_inf, pad, dtype)
            assert RK.kernels_serve(z)
            lse = RK.row_lse(z)
            want = torch.logsumexp(z.double(), -1)
            assert lse.dtype == torch.float32
            assert ((lse.double() - want).abs() / want.abs().clamp_min(1)).max() < 2e-6, (C, V, dtype)
            scale = torch.randn(C, generator=gen)
            full = z.as_strided((C, V + pad), z.stride()).clone()
            out = RK.rest_grad_(z, lse, scale)
            assert out.data_ptr() == z.data_ptr()
            ref = torch.exp(full[:, :V].double() - want[:, None]) * scale.double()[:, None]
            err = (out.double() - ref).abs().max() / ref.abs().max()
            assert err < tol, (C, V, dtype, float(err))
            assert torch.equal(out[full[:, :V] == float("-inf")], torch.zeros_like(out[full[:, :V] == float("-inf")]))
            if pad:
                assert torch.equal(z.as_strided((C, V + pad), z.stride())[:, V:], full[:, V:])
    print("checked")


def check_fused_loss() -> None:
    """fused_span_loss (CE and sparse top-k KD, static and not) with the kernels vs without them
    (the torch row functions): loss, stats and both gradients."""
    from vpmoe.kd import row_kernels as RK
    from vpmoe.kd.fused import fused_span_loss
    from vpmoe.kd.losses import LossSpec, SparseTarget

    gen = torch.Generator().manual_seed(6)
    N, d, V, K = 37, 16, 600, 5
    hidden, head = torch.randn(N, d, generator=gen), torch.randn(V, d, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    span = torch.randint(0, 3, (N,), generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    t_logp = torch.log_softmax(torch.randn(N, K + 1, generator=gen), -1)
    target = SparseTarget(ids, t_logp[:, :K], t_logp[:, K], t_logp[:, 0])

    def run(spec, tgt, static):
        h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
        loss, stats = fused_span_loss(h, w, labels, span, spec, tgt, chunk_size=16, static=static)
        loss.backward()
        return [loss, *stats.values(), h.grad, w.grad]

    for spec, tgt in ((LossSpec(kind="ce"), None), (LossSpec(kind="fkl", ce_weight=0.3), target)):
        for static in (False, True):
            with_kernels = run(spec, tgt, static)
            serve = RK.kernels_serve
            RK.kernels_serve = lambda z, lse=None: False
            try:
                without = run(spec, tgt, static)
            finally:
                RK.kernels_serve = serve
            for a, b in zip(with_kernels, without):
                assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), (spec.kind, static)
    print("checked")


def check_scale() -> None:
    """scale_unless_one_ against the foreach reference (`scale_reference_`, the same rounding):
    fp32, bf16 and fp16, sizes with a partial last block and more blocks than programs (the grid
    strides), scalars of another dtype than x, and s = 1; in place. Bit for bit in fp32 and at
    s = 1; bf16 and fp16 within one unit in the last place, because the interpreter's conversion
    from fp32 truncates where the GPU's rounds to nearest (tests/gpu: bit for bit)."""
    from vpmoe.kd import row_kernels as RK

    assert RK.interpreting()
    gen = torch.Generator().manual_seed(8)
    for shape in ((1000,), (37, 29), (3, 128)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (3 * torch.randn(shape, generator=gen)).to(dtype)
            for s in (torch.randn((), generator=gen), torch.tensor(-0.3, dtype=torch.float64), torch.ones(()),
                      torch.tensor(1.0, dtype=dtype)):
                want = RK.scale_reference_(x.clone(), s)
                got = x.clone()
                out = RK.scale_unless_one_(got, s)
                assert out.data_ptr() == got.data_ptr()
                if dtype == torch.float32 or float(s.to(dtype)) == 1.0:
                    assert torch.equal(got, want), (shape, dtype, float(s))
                else:
                    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
                    err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max()
                    assert err <= ulp, (shape, dtype, float(s), float(err))
                    assert not torch.equal(got, x), (shape, dtype)  # it did scale
    # a non-contiguous view takes the reference, in place as well
    x = torch.randn(8, 6, generator=gen)
    view, s = x.t(), torch.tensor(0.25)
    want = view.clone() * 0.25
    assert torch.equal(RK.scale_unless_one_(view, s), want) and torch.equal(x.t(), want)
    print("checked")


def test_scale_unless_one():
    _in_interpreter("check_scale")


def test_row_kernels_vs_float64():
    _in_interpreter("check_kernels")


def test_row_kernels_several_blocks_per_row():
    _in_interpreter("check_kernels_small_block")


def check_kernels_small_block() -> None:
    check_kernels(block=128, segment_blocks=2)


def test_fused_loss_with_row_kernels():
    _in_interpreter("check_fused_loss")


def test_reference_serves_where_kernels_cannot():
    """Without the interpreter (CPU) and for float64 the torch reference runs: same numbers."""
    from vpmoe.kd import row_kernels as RK

    z = random_logits(4, 300, torch.Generator().manual_seed(7), n_inf=3).double()
    assert not RK.kernels_serve(z) and not RK.kernels_serve(z.float())
    lse = RK.row_lse(z)
    assert torch.equal(lse, torch.logsumexp(z, -1))
    scale = torch.rand(4, dtype=torch.float64)
    want = torch.exp(z - lse[:, None]) * scale[:, None]
    assert torch.equal(RK.rest_grad_(z.clone(), lse, scale), want)

"""The fused loss's Triton row kernels (vpmoe/kd/row_kernels.py) on the GPU, at the real vocabulary:
against float64, and the fused loss with them against the loss with the compiled torch row
functions. The CPU runs the same kernels in the Triton interpreter (tests/test_row_kernels.py)."""
import pytest
import torch

from vpmoe.kd import row_kernels as RK
from vpmoe.kd.fused import fused_span_loss
from vpmoe.kd.losses import LossSpec, SparseTarget

DEV = "cuda"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_row_kernels_cuda(dtype, tol):
    gen = torch.Generator(device=DEV).manual_seed(0)
    C, V = 96, 201088
    z = (4 * torch.randn(C, V, device=DEV, generator=gen)).to(dtype)
    z[:, torch.randperm(V, device=DEV, generator=gen)[:64]] = float("-inf")  # the sparse loss's known ids
    want = torch.logsumexp(z.double(), -1)
    lse = RK.row_lse(z)
    assert ((lse.double() - want).abs() / want.abs()).max().item() < 1e-6
    scale = torch.randn(C, device=DEV, generator=gen)
    ref = torch.exp(z.double() - want[:, None]) * scale.double()[:, None]
    out = RK.rest_grad_(z, lse, scale)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"row kernels {dtype}: rest_grad max err {err:.1e}")
    assert err < tol


@pytest.mark.parametrize("kind", ["ce", "fkl"])
def test_fused_loss_row_kernels_match_torch_rows(kind):
    """Static fused loss, bf16 hidden and head as in the train step: with and without the kernels."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    N, d, V, K = 3000, 1024, 201088, 64
    hidden = torch.randn(N, d, device=DEV, generator=gen).bfloat16()
    head = (0.02 * torch.randn(V, d, device=DEV, generator=gen)).bfloat16()
    labels = torch.randint(0, V, (N,), device=DEV, generator=gen)
    span = torch.randint(0, 3, (N,), device=DEV, generator=gen)
    ids = torch.randint(0, V, (N, K), device=DEV, generator=gen)
    t_logp = torch.log_softmax(torch.randn(N, K + 1, device=DEV, generator=gen), -1)
    target = None if kind == "ce" else SparseTarget(ids, t_logp[:, :K], t_logp[:, K], t_logp[:, 0])
    spec = LossSpec(kind=kind) if kind == "ce" else LossSpec(kind=kind, ce_weight=0.3)

    def run():
        h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
        loss, _ = fused_span_loss(h, w, labels, span, spec, target, static=True)
        loss.backward()
        return loss, h.grad, w.grad

    fast = run()
    serve = RK.kernels_serve
    RK.kernels_serve = lambda z, lse=None: False
    try:
        slow = run()
    finally:
        RK.kernels_serve = serve
    assert abs(fast[0].item() - slow[0].item()) < 1e-5 * abs(slow[0].item())
    for a, b in zip(fast[1:], slow[1:]):  # bf16 gradients: rounding of the same fp32 values
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2

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


def test_scale_unless_one_cuda_and_captured():
    """`scale_unless_one_` on the fp32 head gradient's shape and on bf16: bit for bit the foreach
    reference; at s = 1 the tensor is untouched. Captured in a CUDA graph with the scalar in a
    static buffer, replays follow the scalar's value (the skip is decided on the device)."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    for shape, dtype in (((201088, 1024), torch.float32), ((4096, 1024), torch.bfloat16), ((999,), torch.float32)):
        x = torch.randn(shape, device=DEV, generator=gen).to(dtype)
        for s in (torch.tensor(0.37, device=DEV), torch.tensor(-2.5, device=DEV), torch.ones((), device=DEV)):
            want = RK.scale_reference_(x.clone(), s)
            got = RK.scale_unless_one_(x.clone(), s)
            assert torch.equal(got, want), (shape, dtype, float(s))
    x0 = torch.randn(1 << 20, device=DEV, generator=gen)
    x, s = x0.clone(), torch.ones((), device=DEV)
    RK.scale_unless_one_(x, s)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        RK.scale_unless_one_(x, s)
    for value in (1.0, 0.5, 1.0, -3.0):
        x.copy_(x0)
        s.fill_(value)
        graph.replay()
        assert torch.equal(x, RK.scale_reference_(x0.clone(), s)), value


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


def test_fp32_head_gradient_accumulates_inside_the_gemm():
    """An fp32 master head under bf16 compute (what `vpmoe train` passes): each chunk's grad_z^T h
    is accumulated into the fp32 gradient by one GEMM with fp32 output (`addmm(out_dtype=)`), not
    rounded to bf16 first. Against float64: fp32-accurate, eager and replayed from a CUDA graph
    (the output aliases the accumulator); the end-to-end fused loss's head gradient against the
    same loss in float64 over many chunks."""
    from vpmoe.kd.fused import _accumulate_grad_weight

    gen = torch.Generator(device=DEV).manual_seed(2)
    V, C, d = 201088, 512, 1024
    gz = (1e-3 * torch.randn(C, V, device=DEV, generator=gen)).bfloat16()
    h = torch.randn(C, d, device=DEV, generator=gen).bfloat16()
    gw0 = torch.randn(V, d, device=DEV, generator=gen)
    prod = gz.double().T @ h.double()
    gw = gw0.clone()
    _accumulate_grad_weight(gw, gz, h)
    err = ((gw.double() - gw0.double() - prod).norm() / prod.norm()).item()
    rounded = ((gw0 + (gz.T @ h).float()).double() - gw0.double() - prod).norm().item() / prod.norm().item()
    print(f"fp32 head grad: in-GEMM accumulation err {err:.1e} (a bf16 product cast-added: {rounded:.1e})")
    assert err < 1e-5 and err < rounded / 10
    gw.copy_(gw0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _accumulate_grad_weight(gw, gz, h)
    gw.copy_(gw0)
    graph.replay()
    graph.replay()
    err2 = ((gw.double() - gw0.double() - 2 * prod).norm() / (2 * prod).norm()).item()
    assert err2 < 1e-5, err2
    gw.fill_(float("nan"))  # the first chunk's form writes without reading (no zero fill): NaN does not survive
    _accumulate_grad_weight(gw, gz, h, first=True)
    err3 = ((gw.double() - prod).norm() / prod.norm()).item()
    assert err3 < 1e-5, err3

    N = 3000
    hidden = torch.randn(N, d, device=DEV, generator=gen).bfloat16()
    head = 0.02 * torch.randn(V, d, device=DEV, generator=gen)
    labels = torch.randint(0, V, (N,), device=DEV, generator=gen)
    span = torch.randint(0, 3, (N,), device=DEV, generator=gen)
    spec = LossSpec(kind="ce")
    grads = []
    for h_in, w_in in ((hidden, head), (hidden.double(), head.bfloat16().double())):
        w = w_in.clone().requires_grad_(True)
        loss, _ = fused_span_loss(h_in, w, labels, span, spec, None, chunk_size=512, static=True)
        loss.backward()
        grads.append(w.grad.double())
    err3 = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    print(f"fused loss, fp32 head, 6 chunks: head gradient vs float64 {err3:.1e}")
    assert err3 < 1e-2  # bf16 logits and grad_z, as every bf16 GEMM gradient

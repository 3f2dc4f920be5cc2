"""The router-logits Triton kernel (vpmoe/model/router_fused.py) against torch's bf16x3
(`kernels.mm_bf16x3`) and float64, on the CPU through the Triton interpreter (each check in a
fresh process, see tests/triton_interpreter.py). The GPU runs it compiled and autotuned:
tests/gpu/test_gpu_fast_paths.py::test_router_logits_bf16x3_near_fp32."""
import torch

from tests.triton_interpreter import run_in_interpreter


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_against_bf16x3_and_float64() -> None:
    """Sizes that leave partial row, K and expert tiles (the interpreter's tiles are 16 wide), a
    padded row stride, values over several magnitudes; then `_RouterLogits` on this path (kernel
    forward, bf16 gradients)."""
    from vpmoe.model import kernels as K
    from vpmoe.model import router_fused as RF

    assert RF.available(torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    N, D, E = 45, 40, 24
    big = torch.randn(N, D + 8, generator=g) * torch.logspace(-2, 1, D + 8)
    x = big[:, :D]  # row stride D + 8
    w = torch.randn(E, D, generator=g) * 0.05
    got = RF.router_logits_fused(x, *RF.split_weight(w))
    exact = x.double() @ w.double().t()
    assert _rel(got, K.mm_bf16x3(x, w.t())) < 1e-6, _rel(got, K.mm_bf16x3(x, w.t()))
    assert _rel(got, exact) < 5e-5, _rel(got, exact)
    assert _rel(x.bfloat16().double() @ w.double().t(), exact) > 1e-3  # what bf16 x alone would lose
    # NaN propagates (CUDA's NaN 0x7FFFFFFF would round to -0.0 through the integer rounding unguarded)
    x_nan = x.clone()
    x_nan[3, 5] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    got_nan = RF.router_logits_fused(x_nan, *RF.split_weight(w))
    assert got_nan[3].isnan().all() and torch.equal(got_nan[torch.arange(N) != 3], got[torch.arange(N) != 3])

    xs = x.clone().requires_grad_(True)
    ws = w.clone().requires_grad_(True)
    gy = torch.randn(N, E, generator=g)
    out = K._RouterLogits.apply(xs, ws)
    out.backward(gy)
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    assert torch.equal(out, got)
    assert _rel(xs.grad, bf(gy) @ bf(w)) < 1e-6 and _rel(ws.grad, bf(gy).t() @ bf(x)) < 1e-6
    print("checked")


def test_router_logits_kernel_against_bf16x3_and_float64():
    run_in_interpreter("tests.test_router_fused", "check_against_bf16x3_and_float64", timeout=600)

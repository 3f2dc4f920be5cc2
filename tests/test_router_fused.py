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
    got = RF.router_logits_fused(x, w)
    exact = x.double() @ w.double().t()
    assert _rel(got, K.mm_bf16x3(x, w.t())) < 1e-6, _rel(got, K.mm_bf16x3(x, w.t()))
    assert _rel(got, exact) < 5e-5, _rel(got, exact)
    assert _rel(x.bfloat16().double() @ w.double().t(), exact) > 1e-3  # what bf16 x alone would lose
    # NaN propagates (CUDA's NaN 0x7FFFFFFF would round to -0.0 through the integer rounding unguarded)
    x_nan = x.clone()
    x_nan[3, 5] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    got_nan = RF.router_logits_fused(x_nan, w)
    assert got_nan[3].isnan().all() and torch.equal(got_nan[torch.arange(N) != 3], got[torch.arange(N) != 3])

    xs = x.clone().requires_grad_(True)
    ws = w.clone().requires_grad_(True)
    gy = torch.randn(N, E, generator=g)
    out = K._RouterLogits.apply(xs, ws, None)
    out.backward(gy)
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    assert torch.equal(out, got)
    assert _rel(xs.grad, bf(gy) @ bf(w)) < 1e-6 and _rel(ws.grad, bf(gy).t() @ bf(x)) < 1e-6
    print("checked")


def test_router_logits_kernel_against_bf16x3_and_float64():
    run_in_interpreter("tests.test_router_fused", "check_against_bf16x3_and_float64", timeout=600)


def test_rows_bucket_keys_tuning_by_power_of_two():
    """The autotuning key's token bucket: the power of two at or above N, clamped to [16, 2^20], so
    a batch of 4,096 tokens and one of 16,384 tune apart (their best tiles differ), and every size
    in (2^k, 2^(k+1)] shares one tuning."""
    from vpmoe.model.router_fused import rows_bucket

    assert [rows_bucket(n) for n in (1, 16, 17, 4095, 4096, 4097, 16384)] == [16, 16, 32, 4096, 4096, 8192, 16384]
    assert rows_bucket(1 << 22) == 1 << 20
    assert len({rows_bucket(n) for n in range(1, 70000)}) == 14  # 16 ... 65536 (13), then 2^17

"""The fused routed-expert kernels (vpmoe/model/moe_fused.py) compiled on the GPU, at the model's
dims, against float64 and against the grouped-GEMM path (`kernels.routed_experts`, itself held to float64 here)."""
import pytest
import torch

from tests.test_moe_fused import experts_reference
from vpmoe.model import kernels as K
from vpmoe.model import moe_fused as MF
from vpmoe.model import wgrad as W

DEV = "cuda"
NAMES = ["y", "x", "weight", "w_up", "b_up", "w_down", "b_down"]


def _case(N, d=1024, H=128, E=256, k=4, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(N, E, device=DEV, generator=g)
    scores[:, :4] += 0.3  # a few experts with many rows, as routing makes early in training
    idx = scores.topk(k, dim=-1).indices
    weight = torch.rand(N, k, device=DEV, generator=g) + 0.1
    params = [torch.randn(E, d, H, device=DEV, generator=g) / d**0.5, 0.1 * torch.randn(E, H, device=DEV, generator=g),
              torch.randn(E, H, d, device=DEV, generator=g) / H**0.5, 0.1 * torch.randn(E, d, device=DEV, generator=g)]
    x = torch.randn(N, d, device=DEV, generator=g)
    gy = torch.randn(N, d, device=DEV, generator=g, dtype=torch.float64)
    return x, idx, weight, params, gy


def _run(fn, x, weight, params, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, *params)]
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, gy.to(y.dtype)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_fused_cuda_against_float64_and_grouped(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (conftest restores the setting)
    x, idx, weight, params, gy = _case(3000)
    x = x.to(dtype)
    ref = _run(lambda x, w, *p: experts_reference(x, idx, w, *p), x.double(), weight.double(),
               [p.double() for p in params], gy)
    fused = _run(lambda x, w, *p: MF.routed_experts(x, idx, w, *p), x, weight, params, gy)
    grouped = _run(lambda x, w, *p: K.routed_experts(x, idx, w, *p), x, weight, params, gy)
    for name, f, g, r in zip(NAMES, fused, grouped, ref):
        ef, eg = rel(f, r), rel(g, r)
        print(f"{dtype} {name}: fused rel err {ef:.2e}, grouped {eg:.2e}")
        if dtype == torch.float32:
            assert ef < 1e-5 and eg < 1e-5, (name, ef, eg)
        else:  # the fused kernels no worse than the grouped-GEMM path's own bf16 error
            assert ef <= 1.5 * eg + 1e-4 and ef < 1e-2 and eg < 1e-2, (name, ef, eg)


def test_moe_fused_in_a_captured_graph():
    """The op captured in a CUDA graph (fixed grid, no host sync) replays to the eager values on new data."""
    x, idx, weight, params, gy = _case(2048, seed=1)
    xb = x.bfloat16().requires_grad_(True)
    ps = [p.clone().requires_grad_(True) for p in params]
    static_idx, static_w = idx.clone(), weight.clone()

    def step():
        y = MF.routed_experts(xb, static_idx, static_w, *ps)
        return [y] + list(torch.autograd.grad(y, [xb, *ps], gy.float()))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # autotuning happens here, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    _, idx2, weight2, _, _ = _case(2048, seed=2)
    static_idx.copy_(idx2)
    static_w.copy_(weight2)
    graph.replay()
    eager = step()
    for name, a, b in zip(["y", "x", "w_up", "b_up", "w_down", "b_down"], out, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("gather_a", [True, False])
def test_gathered_wgrad_cuda_against_float64_and_grouped_gemm(gather_a):
    """The grouped path's weight gradients (`gathered_wgrad`, fp32 out) at the model's dims and the (a)
    step's 4,096 tokens: within fp32-sum rounding of float64 over the same bf16 operands, and within
    bf16 rounding of the grouped GEMM it replaced (which rounds its output to bf16); the experts
    taken busiest first give the same bits."""
    from tests.test_moe_fused import _wgrad_reference

    N, k, d, H, E = 4096, 4, 1024, 128, 256
    x, idx, _, _, _ = _case(N)
    r = K.Routing(idx, E)
    g = torch.Generator(device=DEV).manual_seed(1)
    if gather_a:  # the up GEMM: x's rows through the token index, bias gradient beside
        a, b = x.bfloat16(), torch.randn(N * k, H, device=DEV, generator=g).bfloat16()
    else:  # the down GEMM: g's rows through the token index
        a, b = torch.randn(N * k, H, device=DEV, generator=g).bfloat16(), torch.randn(N, d, device=DEV, generator=g).bfloat16()
    dw, db, sq = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a, True)
    ref_w, ref_b = _wgrad_reference(a, b, r.token, r.offsets, gather_a)
    # the clipping norm's partial sums of squares from the kernel's registers (autotuned tiling):
    # every slot written, summing to ||dW||^2 of the dW it stored, and not changing dW
    assert sq.shape == W.sq_shape(E, a.shape[1], b.shape[1]) and torch.isfinite(sq).all()
    sq_err = abs(sq.double().sum() / dw.double().square().sum() - 1).item()
    assert sq_err < 1e-6, sq_err
    assert torch.equal(W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a)[0], dw)
    # the experts taken busiest first (the grouped path's default order): the autotuner keys the order
    # apart and may pick another tiling, so dW and db equal within fp32-sum rounding and the sums of
    # squares in total (their slots follow the tiling); the same bits at one tiling are
    # `test_wgrad_every_config_cuda`'s
    busy = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a, True, False, W.busiest_first(r.offsets))
    for p, q in zip(busy[:2], (dw, db)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(busy[2].double().sum(), sq.double().sum(), rtol=1e-6, atol=0)
    assert dw.dtype == torch.float32 and rel(dw, ref_w) < 1e-5, rel(dw, ref_w)
    rows_a, rows_b = (a[r.token], b) if gather_a else (a, b[r.token])
    old = K.grouped_mm_wgrad(rows_a, rows_b, r.offsets)
    assert rel(old, ref_w) < 1e-2 and rel(dw, ref_w) < rel(old, ref_w) / 10, (rel(dw, ref_w), rel(old, ref_w))
    if gather_a:
        assert rel(db, ref_b) < 1e-5, rel(db, ref_b)
    print(f"gathered wgrad gather_a={gather_a}: rel err {rel(dw, ref_w):.2e} (grouped GEMM {rel(old, ref_w):.2e}); "
          f"sum of squares rel err {sq_err:.2e}")


@pytest.mark.parametrize("gather_a", [True, False])
def test_wgrad_every_config_cuda(gather_a):
    """Every tiling the weight-gradient autotuner may pick (`wgrad.WGRAD_CONFIGS`), forced, at the model's
    dims and the (a) step's 4,096 tokens with a few crowded experts, bf16 dW (the step's) and fp32: within
    fp32-sum rounding of float64 (bf16 rounding for bf16), busiest first and id order the same bits."""
    from tests.test_moe_fused import _wgrad_reference

    N, k, d, H, E = 4096, 4, 1024, 128, 256
    x, idx, _, _, _ = _case(N, seed=3)
    r = K.Routing(idx, E)
    g = torch.Generator(device=DEV).manual_seed(2)
    if gather_a:
        a, b = x.bfloat16(), torch.randn(N * k, H, device=DEV, generator=g).bfloat16()
    else:
        a, b = torch.randn(N * k, H, device=DEV, generator=g).bfloat16(), torch.randn(N, d, device=DEV, generator=g).bfloat16()
    ref_w, ref_b = _wgrad_reference(a, b, r.token, r.offsets, gather_a)
    busiest = W.busiest_first(r.offsets)

    def run(config, out_dtype, order):
        dw = torch.full((E, a.shape[1], b.shape[1]), float("nan"), device=DEV, dtype=out_dtype)
        db = torch.full((E, b.shape[1]), float("nan"), device=DEV) if gather_a else None
        sq = torch.full(W.sq_shape(*dw.shape), float("nan"), device=DEV)
        W.launch(a, b, r.token, r.offsets, dw, db, 1, False, gather_a=gather_a, gather_b=not gather_a,
                 config=config, sq=sq, busiest=order)
        return [t for t in (dw, db, sq) if t is not None]

    for config in W.WGRAD_CONFIGS:
        for out_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-3)):
            out = run(config, out_dtype, busiest)
            assert all(torch.isfinite(t).all() for t in out), config
            assert rel(out[0].double(), ref_w) < tol, (config, out_dtype, rel(out[0].double(), ref_w))
            if gather_a:
                assert rel(out[1].double(), ref_b) < 1e-5, config
            assert all(torch.equal(p, q) for p, q in zip(out, run(config, out_dtype, None))), (config, "order")

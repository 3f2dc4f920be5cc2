"""The local-attention prologue's Triton kernels compiled on the GPU (tests/test_tpa_fused.py runs
them on the CPU through the Triton interpreter), against the float64 reference, forward and all
eight gradients, at the model's dims (8 q heads, 2 kv heads, head_dim 128, TPA ranks 4/2) and a
token count that leaves a partial block; fp32 storage to fp32 precision, bf16 storage to what
rounding the stored proj, q and k to bf16 allows. And inside a compiled, CUDA-graphed block."""
import pytest
import torch

from tests.test_tpa_fused import random_inputs
from vpmoe.model import tpa_fused as TF

DEV = "cuda"
DIMS = [8, 2, 128, 4, 2]
GRAD_NAMES = ["proj", "q_bias", "k_bias", "v_bias", "q_w", "k_w", "cos", "sin"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_tpa_prologue_kernel_cuda(dtype, tol):
    assert TF.available(torch.device(DEV))
    B, T = 3, 2047
    gen = torch.Generator().manual_seed(0)
    ins = [x.to(DEV) for x in random_inputs(B * T, DIMS, gen)]
    ins[0] = ins[0].to(dtype)  # the projection GEMM's output dtype
    leaves = [x.detach().clone().requires_grad_(True) for x in ins]
    out = TF.local_qkv(*leaves, T, 1e-5, DIMS)
    assert [o.dtype for o in out] == [dtype, dtype, torch.float32]
    ref_leaves = [x.detach().double().requires_grad_(True) for x in ins]
    ref = TF.tpa_prologue_reference(*ref_leaves, T, 1e-5, DIMS)
    for name, o, r in zip("qkv", out, ref):
        assert rel_err(o, r) < tol, (name, rel_err(o, r))
    grads = [torch.randn(r.shape, device=DEV, dtype=torch.float64, generator=torch.Generator(DEV).manual_seed(i))
             for i, r in enumerate(ref)]
    got = torch.autograd.grad(out, leaves, [g.to(o.dtype) for g, o in zip(grads, out)])
    want = torch.autograd.grad(ref, ref_leaves, grads)
    errs = {n: rel_err(a, b) for n, a, b in zip(GRAD_NAMES, got, want)}
    print(f"tpa prologue {dtype}: rel err", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < tol, errs


def test_tpa_prologue_backward_every_config():
    """Every backward config the tuner may try at (a)'s 4,096 tokens (the short programs too) gives
    the same gradients as the float64 reference, each forced in turn (bf16 storage, the step's)."""
    from tests.gpu.helpers import forced_config

    B, T = 2, 2048
    gen = torch.Generator().manual_seed(1)
    ins = [x.to(DEV) for x in random_inputs(B * T, DIMS, gen)]
    ins[0] = ins[0].to(torch.bfloat16)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in ins]
    ref = TF.tpa_prologue_reference(*ref_leaves, T, 1e-5, DIMS)
    grads = [torch.randn(r.shape, device=DEV, dtype=torch.float64, generator=torch.Generator(DEV).manual_seed(i))
             for i, r in enumerate(ref)]
    want = torch.autograd.grad(ref, ref_leaves, grads)
    tuner = TF._tuned("backward")
    tried = TF.backward_configs(B * T)
    assert len(tried) == len(TF.BACKWARD_CONFIGS) + len(TF.SHORT_BACKWARD_CONFIGS)
    for config in tuner.configs:
        key = (config.kwargs["BN"], config.kwargs["BLOCKS"], config.num_warps)
        assert key in tried
        with forced_config(tuner, config):
            leaves = [x.detach().clone().requires_grad_(True) for x in ins]
            out = TF.local_qkv(*leaves, T, 1e-5, DIMS)
            got = torch.autograd.grad(out, leaves, [g.to(o.dtype) for g, o in zip(grads, out)])
        errs = {n: rel_err(a, b) for n, a, b in zip(GRAD_NAMES, got, want)}
        print(f"tpa prologue backward {key}: max rel err {max(errs.values()):.1e}")
        assert max(errs.values()) < 1e-2, (key, errs)


def test_tpa_prologue_in_compiled_graphed_block():
    """A local MoE block in bf16, compiled (fullgraph, the custom op opaque) and replayed from a CUDA
    graph, is no further from the fp32 eager block than the bf16 eager block is (outputs and the
    attention's gradients; compiled and eager round to bf16 at different places, so they are
    compared through the fp32 run, not with each other)."""
    from tests.gpu.helpers import small_cfg
    from vpmoe.model.fast import FastBody, make_block_fn
    from vpmoe.model.model import VpMoE, positions_from_docs

    torch._dynamo.reset()
    cfg = small_cfg()
    with torch.device(DEV):
        model = VpMoE(cfg)
    body = FastBody(model, compile=False)
    assert body.fused_prologue
    params = body.params[1]
    B, T = 2, 2048
    doc = torch.zeros(B, T, dtype=torch.long, device=DEV)
    doc[0, 700:] = 1
    docbuf, local, _ = body.doc_masks(doc)
    pos = positions_from_docs(docbuf)
    gen = torch.Generator(DEV).manual_seed(1)
    x = torch.randn(B, T, cfg.d_model, device=DEV, generator=gen, requires_grad=True)
    v_first = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, device=DEV, generator=gen)
    g = torch.randn(B, T, cfg.d_model, device=DEV, generator=gen)
    # the attention's parameters: routing parameters' gradients move with near-tied expert choices
    leaves = [x] + [p for n, p in params.items() if n.startswith("attn.")]
    fn = make_block_fn(cfg, 1, torch.bfloat16, True, fused_prologue=True)
    exact_fn = make_block_fn(cfg, 1, torch.float32, True, fused_prologue=True)

    def run(f):
        y = f(params, x, pos, docbuf, v_first, local, None)[0]
        return [y.detach()] + list(torch.autograd.grad([y], leaves, [g], allow_unused=True))

    eager, exact = run(fn), run(exact_fn)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(2):
            run(compiled)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(compiled)
    graph.replay()
    torch.cuda.synchronize()
    names = ["y", "x"] + [n for n in params if n.startswith("attn.")]
    for name, x32, a, b in zip(names, exact, eager, static):
        if x32 is None:  # a parameter this block does not use
            assert a is None and b is None, name
            continue
        e_eager, e_graph = rel_err(a, x32), rel_err(b, x32)
        assert e_graph <= 1.5 * e_eager + 1e-2, (name, e_eager, e_graph)

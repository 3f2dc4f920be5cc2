"""The local-attention prologue's Triton kernels (vpmoe/model/tpa_fused.py) against the float64
reference, on the CPU through the Triton interpreter (TRITON_INTERPRET=1, which must be set
before the kernels are defined: each check runs in a fresh interpreter process). The GPU runs
the same kernels compiled: tests/gpu/test_gpu_tpa_prologue.py.

Triton is a test dependency (`pip install -e .[test]`); the kernels run where the product runs
them, on CUDA, and the CPU product falls back to the reference (`local_qkv`)."""
import os

import pytest
import torch

from tests.triton_interpreter import run_in_interpreter


def _in_interpreter(check: str) -> None:
    run_in_interpreter("tests.test_tpa_fused", check, timeout=900)


def test_triton_is_installed_for_these_tests():
    """Not a skip: without Triton the interpreter checks below cannot run, and that is a failure."""
    import triton  # noqa: F401  (pip install -e .[test])


def random_inputs(N: int, dims, gen, width_pad: int = 0):
    from vpmoe.model.tpa_fused import column_layout

    H, G, D = dims[:3]
    W = sum(column_layout(*dims))
    big = torch.randn(N, W + width_pad, generator=gen)
    proj = big[:, :W]  # a row stride wider than the row when width_pad > 0
    qb, kb, vb = (0.3 * torch.randn(n * D, generator=gen) for n in (H, G, G))
    qw, kw = (1 + 0.2 * torch.randn(D, generator=gen) for _ in range(2))
    angles = 6 * torch.rand(N, D // 2, generator=gen)
    return [proj, qb, kb, vb, qw, kw, angles.cos(), angles.sin()]


def check_kernels() -> None:
    """Forward outputs and all eight gradients, fp32 kernels vs float64 autograd of the reference:
    a token count that leaves a partial block, a padded row stride, non-contiguous output grads."""
    from vpmoe.model import tpa_fused as TF

    assert TF.interpreting()
    gen = torch.Generator().manual_seed(3)
    for dims, B, T, pad in (([4, 2, 32, 4, 2], 2, 21, 0), ([8, 2, 64, 4, 2], 1, 37, 8), ([2, 1, 32, 2, 1], 3, 5, 0),
                            ([3, 1, 32, 3, 3], 1, 9, 0)):
        ins = random_inputs(B * T, dims, gen, pad)
        # proj stays the strided view itself; the rest are fresh leaves
        leaves = [ins[0].detach().requires_grad_(True)] + [x.detach().clone().requires_grad_(True) for x in ins[1:]]
        out = TF.tpa_prologue(*leaves, T, 1e-5, dims)
        ref_leaves = [x.detach().double().requires_grad_(True) for x in ins]
        ref = TF.tpa_prologue_reference(*ref_leaves, T, 1e-5, dims)
        assert [o.dtype for o in out] == [torch.float32, torch.float32, torch.float32]
        for name, o, r in zip("qkv", out, ref):
            assert o.shape == r.shape, (name, o.shape, r.shape)
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=name)
        # output gradients as transposed views (Flex's backward hands back strided tensors)
        grads = [torch.randn(r.shape[0], r.shape[2], r.shape[1], r.shape[3], generator=gen,
                             dtype=torch.float64).transpose(1, 2) for r in ref]
        got = torch.autograd.grad(out, leaves, [g.float() for g in grads])
        want = torch.autograd.grad(ref, ref_leaves, grads)
        names = "proj q_bias k_bias v_bias q_w k_w cos sin".split()
        for name, a, b in zip(names, got, want):
            assert a.shape == b.shape, name
            scale = b.abs().max().item()
            err = (a.double() - b).abs().max().item() / scale
            assert scale > 0 and err < 2e-6, (dims, name, err)
    # a loss on q alone (k and v get no gradient): the op's backward takes their gradients as zeros
    got = torch.autograd.grad(TF.tpa_prologue(*leaves, T, 1e-5, dims)[0].square().sum(), leaves)
    ref = TF.tpa_prologue_reference(*ref_leaves, T, 1e-5, dims)
    want = torch.autograd.grad(ref[0].square().sum(), ref_leaves, allow_unused=True)
    for name, a, b in zip(names, got, want):
        if name in ("k_bias", "v_bias", "k_w"):
            assert b is None and not a.any(), name
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)
    print("checked")


def check_fast_body() -> None:
    """FastBody with the fused prologue vs without (its torch form), fp32: hidden state, aux loss
    and every parameter gradient, on a model whose local layers take the kernel (head_dim 32)."""
    from tests.test_model import assert_same_fast_body_step, fast_body_step, randomize, small
    from vpmoe.model.model import VpMoE

    cfg = small(n_layers=4, d_model=32, head_dim=32, n_heads=4, n_kv_heads=2)
    model = randomize(VpMoE(cfg), seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 11 + [1] * 8, [0] * 4 + [1] * 15])
    plain_body, plain = fast_body_step(model, tokens, doc, fused_prologue=False)
    fused_body, fused = fast_body_step(model, tokens, doc, fused_prologue=True)
    assert plain_body.fused_prologue is False and fused_body.fused_prologue is True
    assert_same_fast_body_step(fused, plain)
    assert any("log_freq" in n for n in plain[3]) and any("q_bias" in n for n in plain[3])
    print("checked")


def check_compiled_block() -> None:
    """A local block with the fused prologue traces as one graph (the op is opaque to dynamo:
    0 graph breaks) and equals its eager self, forward and backward."""
    from tests.test_model import randomize, small
    from vpmoe.model.fast import FastBody, make_block_fn
    from vpmoe.model.model import VpMoE, positions_from_docs

    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, head_dim=32)
    model = randomize(VpMoE(cfg), seed=2)
    params = FastBody._block_params(model.layers[1])
    fn = make_block_fn(cfg, 1, torch.bfloat16, flex=False, fused_prologue=True)  # bf16 GEMMs, as on the GPU
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    doc = torch.tensor([[0] * 9 + [1] * 7])
    pos = positions_from_docs(doc)
    v_first = torch.randn(1, cfg.n_kv_heads, 16, cfg.head_dim, generator=torch.Generator().manual_seed(4))
    outs = []
    for f in (fn, compiled):
        x = torch.randn(1, 16, cfg.d_model, generator=torch.Generator().manual_seed(7), requires_grad=True)
        for p in params.values():
            p.grad = None
        y, v, aux, _ = f(params, x, pos, doc, v_first, None, None)
        assert v is None  # a later layer's values are not returned (only the first layer's are read again)
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux).backward()
        outs.append((y.detach(), x.grad.clone(), params["attn.log_freq"].grad.clone(), params["attn.b_q.weight"].grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    print("checked")


def check_padded_projection_passes_through() -> None:
    """Inductor pads the projection GEMM's output rows (vpMoE's 1064 columns to a 1088-column
    stride); the ops' layout tag lets that buffer reach the kernel as it is, where the default
    (exact traced strides) copied it into a dense one first. Compiled with Inductor on the CPU, its
    padding switched on as on a GPU and its caches off (a cached graph would hide a tag change): the
    forward's code passes the GEMM's own output to the op, and the backward's passes the same saved
    buffer to the backward op; the gradients equal the eager op's on a dense projection."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from vpmoe.model import tpa_fused as TF

    dims, T, B = [8, 2, 128, 4, 2], 16, 2  # vpMoE's local layers: 1064 columns
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B * T, 256, generator=gen)
    w = torch.randn(sum(TF.column_layout(*dims)), 256, generator=gen) / 16
    rest = random_inputs(B * T, dims, gen)[1:]

    def loss(x, w):
        q, k, v = TF.tpa_prologue(x @ w.t(), *rest, T, 1e-5, dims)
        return (q * 1.5).sum() + k.square().sum() + (v * v.detach()).sum()

    torch._dynamo.reset()
    with inductor_config.patch(disable_padding_cpu=False, force_disable_caches=True):
        leaves = [t.clone().requires_grad_(True) for t in (x, w)]
        _, (fwd, bwd) = run_and_get_code(lambda: torch.compile(loss, fullgraph=True)(*leaves).backward())
    gemm_out = re.search(r"extern_kernels\.mm\(.*out=(buf\d+)\)", fwd).group(1)
    assert re.search(r"empty_strided_cpu\(\(32, 1064\), \(1088, 1\)", fwd), "Inductor did not pad the rows"
    assert f"torch.ops.vpmoe.tpa_prologue.default({gemm_out}," in fwd, fwd
    # the backward gets the saved GEMM output itself, padded rows and all (without the tag: a second copy)
    call = next(line for line in bwd.splitlines() if "vpmoe.tpa_prologue_backward.default(" in line)
    assert re.search(r"assert_size_stride\(mm, \(32, 1064\), \(1088, 1\)", bwd) and ", mm, " in call, call
    # a projection with strided columns (column-major) is copied and gives the dense one's outputs
    dense = x @ w.t()
    for a, b in zip(TF.tpa_prologue(dense.t().contiguous().t(), *rest, T, 1e-5, dims),
                    TF.tpa_prologue(dense, *rest, T, 1e-5, dims)):
        assert torch.equal(a, b)
    eager = [t.clone().requires_grad_(True) for t in (x, w)]
    loss(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    print("checked")


@pytest.mark.parametrize("check", ["check_kernels", "check_fast_body", "check_compiled_block",
                                   "check_padded_projection_passes_through"])
def test_in_triton_interpreter(check):
    _in_interpreter(check)


def test_local_qkv_falls_back_to_the_reference_on_cpu():
    """Without the interpreter, CPU tensors take the reference (the product's CPU path)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run this file without TRITON_INTERPRET (its checks set it in subprocesses)")
    from vpmoe.model import tpa_fused as TF

    dims = [4, 2, 32, 4, 2]
    ins = random_inputs(12, dims, torch.Generator().manual_seed(0))
    assert not TF.available(torch.device("cpu"))
    for a, b in zip(TF.local_qkv(*ins, 6, 1e-5, dims), TF.tpa_prologue_reference(*ins, 6, 1e-5, dims)):
        assert torch.equal(a, b)
    # head_dim a power of two >= 32, ranks 1..4 (the kernels' rank slots)
    assert not TF.supported([4, 2, 24, 4, 2]) and not TF.supported([4, 2, 32, 5, 2]) and not TF.supported([4, 2, 32, 4, 0])
    assert TF.supported(dims) and TF.supported([4, 2, 32, 3, 1])
    with pytest.raises(ValueError, match="power-of-two head_dim"):  # the op itself says why
        TF._check(ins[0], 6, [4, 2, 24, 4, 2])



def test_backward_configs_fit_the_partial_sum_buffer():
    """Every backward config tried for N tokens launches no more programs than the partial-sum buffer
    has rows, and the pruning hook Triton calls keeps exactly those configs: the short programs are
    tried at (a)'s 4,096 tokens, not at the 80-layer step's 65,536, where the long ones are as before."""
    import triton

    from vpmoe.model import tpa_fused as TF

    every = TF.BACKWARD_CONFIGS + TF.SHORT_BACKWARD_CONFIGS
    configs = [triton.Config({"BN": bn, "BLOCKS": blocks}, num_warps=w) for bn, blocks, w in every]
    for N in (1, 5, 100, 4096, 16384, 65536, 1 << 20):
        kept = TF.backward_configs(N)
        programs = [-(-N // (bn * blocks)) for bn, blocks, _ in kept]
        assert max(programs) == TF.partial_rows(N)
        assert set(TF.BACKWARD_CONFIGS) <= set(kept) <= set(every)
        for c in TF.SHORT_BACKWARD_CONFIGS:  # a short config is tried exactly where it fits the cap
            assert (c in kept) == (-(-N // (c[0] * c[1])) <= TF.SHORT_MAX_PROGRAMS), (N, c)
        pruned = TF._prune_backward(configs, {"N": N, "T": 2048})
        assert sorted((c.kwargs["BN"], c.kwargs["BLOCKS"], c.num_warps) for c in pruned) == sorted(kept), N
    assert len(TF.backward_configs(4096)) == len(every)
    assert TF.backward_configs(65536) == TF.BACKWARD_CONFIGS and TF.partial_rows(65536) == 2048

"""The fused routed-expert kernels (vpmoe/model/moe_fused.py) against a float64 reference, on the
CPU through the Triton interpreter (each check in a fresh process, see tests/triton_interpreter.py).
The GPU runs them compiled: tests/gpu/test_gpu_moe_fused.py."""
import pytest
import torch

from tests.triton_interpreter import run_in_interpreter


def experts_reference(x, idx, weight, w_up, b_up, w_down, b_down):
    """y[t] = sum_s weight[t, s] * (relu(x[t] @ W_up[e] + b_up[e])^2 @ W_down[e] + b_down[e]),
    e = idx[t, s]: every (token, slot) with its own expert's weights, no sorting."""
    h = torch.einsum("nd,nkdh->nkh", x, w_up[idx]) + b_up[idx]
    out = torch.einsum("nkh,nkhd->nkd", torch.relu(h) ** 2, w_down[idx]) + b_down[idx]
    return (out * weight.unsqueeze(-1)).sum(1)


def random_case(N: int, d: int, H: int, E: int, k: int, gen, x_dtype=torch.float32):
    """Uneven routing: expert 1 gets no rows, expert 0 many (several row tiles), the rest at random."""
    scores = torch.rand(N, E, generator=gen)
    scores[:, 0] += 0.6
    scores[:, 1] = -1.0
    idx = scores.topk(k, dim=-1).indices
    weight = torch.rand(N, k, generator=gen) + 0.1
    params = [torch.randn(E, d, H, generator=gen) / d**0.5, 0.3 * torch.randn(E, H, generator=gen),
              torch.randn(E, H, d, generator=gen) / H**0.5, 0.3 * torch.randn(E, d, generator=gen)]
    x = torch.randn(N, d, generator=gen).to(x_dtype)
    return x, idx, weight, params


def _grads(fn, x, weight, params, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, *params)]
    y = fn(leaves[0], leaves[1], *leaves[2:])
    return y, torch.autograd.grad(y, leaves, gy.to(y.dtype))


def check_against_float64() -> None:
    from vpmoe.model import moe_fused as MF

    assert MF.interpreting()
    gen = torch.Generator().manual_seed(0)
    names = ["x", "weight", "w_up", "b_up", "w_down", "b_down"]
    for N, d, H, E, k in ((37, 64, 32, 8, 3), (20, 32, 16, 4, 1)):
        x, idx, weight, params = random_case(N, d, H, E, k, gen)
        gy = torch.randn(N, d, generator=gen, dtype=torch.float64)
        y, got = _grads(lambda x, w, *p: MF.routed_experts(x, idx, w, *p), x, weight, params, gy)
        y_ref, ref = _grads(lambda x, w, *p: experts_reference(x, idx, w, *p), x.double(), weight.double(),
                            [p.double() for p in params], gy)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        for name, g, r in zip(names, got, ref):
            assert g.dtype == torch.float32, name
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)
        assert ref[3][1].abs().max() == 0 and got[3][1].abs().max() == 0  # the expert without rows
    print("checked")


def check_bf16_inputs() -> None:
    """bf16 x (the GPU's GEMM dtype) with fp32 weights: rounding-level agreement with float64 of the
    same bf16 x (weights and activations are rounded to bf16 inside the GEMMs)."""
    from vpmoe.model import moe_fused as MF

    gen = torch.Generator().manual_seed(1)
    x, idx, weight, params = random_case(45, 64, 32, 8, 4, gen, torch.bfloat16)
    gy = torch.randn(45, 64, generator=gen, dtype=torch.float64)
    y, got = _grads(lambda x, w, *p: MF.routed_experts(x, idx, w, *p), x, weight, params, gy)
    y_ref, ref = _grads(lambda x, w, *p: experts_reference(x, idx, w, *p), x.double(), weight.double(),
                        [p.double() for p in params], gy)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for g, r in zip([y, *got], [y_ref, *ref]):
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < 1e-2, err  # bf16 rounding of the GEMM operands and of h: ~0.3-0.5%
    print("checked")


def check_compiled() -> None:
    """Under torch.compile(fullgraph) the op is one opaque node: same values and gradients."""
    from vpmoe.model import moe_fused as MF

    gen = torch.Generator().manual_seed(2)
    x, idx, weight, params = random_case(24, 32, 16, 4, 2, gen)
    gy = torch.randn(24, 32, generator=gen, dtype=torch.float64)

    def f(x, w, *p):
        return MF.routed_experts(x, idx, w, *p) * 2 + 1

    eager = _grads(f, x, weight, params, gy)
    compiled = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), x, weight, params, gy)
    for a, b in zip([eager[0], *eager[1]], [compiled[0], *compiled[1]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print("checked")


def check_fast_body() -> None:
    """FastBody with fused_moe=True vs the grouped-GEMM path, fp32: hidden state, aux loss, expert
    load and every parameter gradient (the op inside the block function, routing included)."""
    from tests.test_model import assert_same_fast_body_step, fast_body_step, randomize, small
    from vpmoe.model.model import VpMoE

    cfg = small(n_layers=3, d_model=32, expert_ffn=16, n_experts=8)
    model = randomize(VpMoE(cfg), seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])
    grouped_body, grouped = fast_body_step(model, tokens, doc, fused_moe=False)
    fused_body, fused = fast_body_step(model, tokens, doc, fused_moe=True)
    assert grouped_body.fused_moe is False and fused_body.fused_moe is True
    assert_same_fast_body_step(fused, grouped)
    assert any("w_down" in n for n in grouped[3]) and any("b_up" in n for n in grouped[3])
    print("checked")


def _wgrad_reference(a, b, index, offsets, gather_a):
    """float64 per-expert sums over each group's sorted rows, with the named operand gathered."""
    a, b = a.double(), b.double()
    a, b = (a[index], b) if gather_a else (a, b[index])
    dw, db, start = [], [], 0
    for end in offsets.tolist():
        dw.append(a[start:end].T @ b[start:end])
        db.append(b[start:end].sum(0))
        start = end
    return torch.stack(dw), torch.stack(db)


def check_gathered_wgrad() -> None:
    """`gathered_wgrad` (the grouped path's weight gradients) against float64: both forms (the up
    GEMM's rows gathered from x, the down GEMM's from g), fp32 and bf16 operands, an expert with no
    rows, one with more rows than a tile, widths off the tile grid; then the grouped path's
    `_GatherGemm` / `_DownSum` gradients with the kernel in them against plain float64 autograd."""
    from vpmoe.model import kernels as K
    from vpmoe.model import moe_fused as MF
    from vpmoe.model import wgrad as W
    from vpmoe.model.kernels import Routing, _DownSum, _GatherGemm

    assert MF.interpreting()
    K.FUSED_WGRAD = True  # the default; this process is the check's own
    gen = torch.Generator().manual_seed(4)
    N, k, d, H, E = 29, 3, 40, 24, 6
    scores = torch.rand(N, E, generator=gen)
    scores[:, 0] += 0.6  # expert 0: most tokens (several 16-row tiles)
    scores[:, 1] = -1.0  # expert 1: no rows
    idx = scores.topk(k, dim=-1).indices
    r = Routing(idx, E)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        x, g = torch.randn(N, d, generator=gen).to(dtype), torch.randn(N * k, H, generator=gen).to(dtype)
        dw, db, _ = W.gathered_wgrad(x, g, r.token, r.offsets, True, True)
        ref_w, ref_b = _wgrad_reference(x, g, r.token, r.offsets, True)
        assert dw.dtype == db.dtype == torch.float32 and dw.shape == (E, d, H)
        torch.testing.assert_close(dw.double(), ref_w, rtol=tol, atol=tol)
        torch.testing.assert_close(db.double(), ref_b, rtol=tol, atol=tol)
        assert dw[1].abs().max() == 0 and db[1].abs().max() == 0
        u, gy = torch.randn(N * k, H, generator=gen).to(dtype), torch.randn(N, d, generator=gen).to(dtype)
        dw, db, _ = W.gathered_wgrad(u, gy, r.token, r.offsets, False, False)
        assert dw.shape == (E, H, d) and db.numel() == 0
        torch.testing.assert_close(dw.double(), _wgrad_reference(u, gy, r.token, r.offsets, False)[0], rtol=tol,
                                   atol=tol)

    # busiest experts first: the order is a plain sort by (-rows, id); the programs in that order
    # write the same bits (dW, the bias's row of tiles and sums of squares, a tiling with several tiles per expert)
    counts = torch.diff(r.offsets, prepend=r.offsets.new_zeros(1)).tolist()
    busiest = W.busiest_first(r.offsets)
    assert busiest.dtype == torch.int32 and busiest.tolist() == sorted(range(E), key=lambda e: (-counts[e], e))
    assert busiest[0] == 0 and busiest[-1] == 1, busiest  # the crowded expert first, the empty one last
    for a, b, gather_a in ((x, g, True), (u, gy, False)):
        for config in (None, (16, 16, 16, 4, 2)):
            outs = []
            for order in (None, busiest):
                dw = torch.full((E, a.shape[1], b.shape[1]), float("nan"))
                sq = torch.full(W.sq_shape(*dw.shape), float("nan"))
                db = torch.full((E, b.shape[1]), float("nan")) if gather_a else None
                W.launch(a, b, r.token, r.offsets, dw, db, 1, False, gather_a=gather_a, gather_b=not gather_a,
                         config=config, sq=sq, busiest=order)
                outs.append([t for t in (dw, db, sq) if t is not None])
            assert not any(t.isnan().any() for t in outs[1]), config
            assert all(torch.equal(p, q) for p, q in zip(*outs)), (gather_a, config)
        torch.testing.assert_close(outs[1][0].double(), _wgrad_reference(a, b, r.token, r.offsets, gather_a)[0],
                                   rtol=1e-5, atol=1e-5)
    # the kernel reads the order: every program pointed at expert 2 leaves the others unwritten
    dw = torch.full((E, d, H), float("nan"))
    W.launch(x, g, r.token, r.offsets, dw, None, 1, False, gather_a=True, busiest=torch.full_like(busiest, 2))
    assert not dw[2].isnan().any() and dw[torch.arange(E) != 2].isnan().all()
    for bad in (busiest[:-1], busiest.long()):  # one short, or int64: refused before any launch
        try:
            W.launch(x, g, r.token, r.offsets, dw, None, 1, False, gather_a=True, busiest=bad)
            raise AssertionError(f"busiest {bad.dtype} {tuple(bad.shape)} was accepted")
        except ValueError as e:
            assert "busiest is" in str(e) and f"int32 ({E},)" in str(e), e

    calls = []
    original = W.launch
    W.launch = lambda *a, **kw: calls.append(kw.get("busiest")) or original(*a, **kw)
    f64 = {"dtype": torch.float64, "generator": gen}
    leaves64 = [torch.randn(N, d, **f64), torch.randn(E, d, H, **f64) / d**0.5, torch.randn(E, H, **f64),
                torch.randn(N * k, H, **f64), torch.rand(N, k, **f64), torch.randn(E, H, d, **f64) / H**0.5,
                torch.randn(E, d, **f64)]
    gh, gy = torch.randn(N * k, H, **f64), torch.randn(N, d, **f64)

    def grads(dtype, fast):
        x, w, b, u, c, w2, b2 = leaves = [t.to(dtype).requires_grad_() for t in leaves64]
        if fast:
            h = _GatherGemm.apply(x, w, b, r.token, r.expert, r.inverse, r.offsets, k)
            y = _DownSum.apply(u, c, w2, b2, idx, r.inverse, r.token, r.offsets)
        else:
            h = torch.cat([x[r.token][r.expert == e] @ w[e] + b[e] for e in range(E)])
            c_rows = c.flatten()[r.order]
            rows = torch.cat([u[r.expert == e] @ w2[e] + c_rows[r.expert == e, None] * b2[e] for e in range(E)])
            y = rows[r.inverse].view(N, k, d).sum(1)
        return torch.autograd.grad((h * gh.to(dtype)).sum() + (y * gy.to(dtype)).sum(), leaves)

    want = grads(torch.float64, False)
    default_limit = K.GATHERED_WGRAD_MAX_ROWS
    # with the rows at the limit the kernel serves; with the limit one row under them, the grouped
    # GEMMs (the same gradients)
    for limit, launches in ((N * k, 2), (N * k - 1, 0)):
        K.GATHERED_WGRAD_MAX_ROWS = limit
        calls.clear()
        got = grads(torch.float32, True)
        assert len(calls) == launches, (limit, calls)  # the up and the down weight gradient
        for name, a, b in zip(["x", "w_up", "b_up", "u", "c", "w_down", "b_down"], got, want):
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"{name} at limit {limit}")

    # routed_experts decides the same way: above the limit the weights are cast before the
    # Functions and the probes get no partial sums (the optimizer then reads those gradients)
    x, w_up, b_up = (leaves64[i].detach().float() for i in range(3))
    w_down, b_down = torch.randn(E, H, d, generator=gen) / H**0.5, torch.randn(E, d, generator=gen)
    weight = torch.rand(N, k, generator=gen)
    for limit, launches in ((N * k, 2), (N * k - 1, 0)):
        K.GATHERED_WGRAD_MAX_ROWS = limit
        calls.clear()
        ws = [t.detach().clone().requires_grad_() for t in (w_up, b_up, w_down, b_down)]
        probes = (K.sq_probe(ws[0]), K.sq_probe(ws[2]))
        y = K.routed_experts(x, idx, weight, *ws, probes=probes)
        (y * gy.float()).sum().backward()
        assert len(calls) == launches, (limit, calls)
        assert all(torch.equal(order, busiest) for order in calls)  # routed_experts hands the kernel the order
        assert all((p.grad is not None) == bool(launches) for p in probes), limit
        assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in ws), limit
        if launches:
            served = [w.grad for w in ws]
        else:  # the same gradients from the grouped GEMMs
            for name, a, b in zip(["w_up", "b_up", "w_down", "b_down"], [w.grad for w in ws], served):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    K.GATHERED_WGRAD_MAX_ROWS = default_limit
    # no backward, no order: sampling's forward steps launch no sort for it
    sorts, real_sort = [], W.busiest_first
    W.busiest_first = lambda offsets: sorts.append(1) or real_sort(offsets)
    with torch.no_grad():
        K.routed_experts(x, idx, weight, w_up, b_up, w_down, b_down)
    assert sorts == []
    K.routed_experts(x, idx, weight, w_up.requires_grad_(), b_up, w_down, b_down)
    assert sorts == [1]
    W.busiest_first = real_sort
    print("checked")


def check_grad_sq() -> None:
    """The weight gradients' sums of squares from `_wgrad_kernel` (`gathered_wgrad(sq=True)`):
    - the op, both operand sides, fp32 and bf16: the partials [sq_shape] sum to ||dW||^2 (float64 of
      the kernel's own dW and of the float64 reference); dW and db are the bits of the op without sq;
    - the launch at forced tilings whose tiles cover 1x1 and 2x1 slots, into NaN-filled buffers:
      every slot written, the covering tile's partial in its first slot and 0 in the others;
    - FastBody with `grad_sq` (eager; compiled through AOTAutograd, with and without checkpointed
      blocks): gradients bit-equal to without, the probes' gradients sum to each expert weight's
      ||grad||^2 and the embedding's part to its ||grad||^2, and the optimizer's clipping norm from
      them equals `_foreach_norm`'s over every gradient."""
    import copy

    from tests.test_model import randomize, small
    from vpmoe.model import moe_fused as MF
    from vpmoe.model import wgrad as W
    from vpmoe.model.fast import FastBody
    from vpmoe.model.kernels import Routing
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim import OptimConfig, build_optimizer
    from vpmoe.train.optim_fast import FastMuonAdamW

    assert MF.interpreting()
    gen = torch.Generator().manual_seed(5)
    N, k, d, H, E = 29, 3, 40, 24, 6  # widths off the 16-slot grid: partial edge slots
    scores = torch.rand(N, E, generator=gen)
    scores[:, 0] += 0.6
    scores[:, 1] = -1.0  # an expert with no rows: zero partials
    r = Routing(scores.topk(k, dim=-1).indices, E)
    for dtype in (torch.float32, torch.bfloat16):
        x, g = torch.randn(N, d, generator=gen).to(dtype), torch.randn(N * k, H, generator=gen).to(dtype)
        u, gy = torch.randn(N * k, H, generator=gen).to(dtype), torch.randn(N, d, generator=gen).to(dtype)
        for a, b, gather_a in ((x, g, True), (u, gy, False)):
            dw, db, sq = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a, True)
            dw0, db0, none = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a)
            assert torch.equal(dw, dw0) and torch.equal(db, db0) and none.numel() == 0
            assert sq.shape == W.sq_shape(E, a.shape[1], b.shape[1]) == (E, -(-a.shape[1] // 16), -(-b.shape[1] // 16))
            ref = _wgrad_reference(a, b, r.token, r.offsets, gather_a)[0]
            torch.testing.assert_close(sq.double().sum(), dw.double().square().sum(), rtol=1e-6, atol=0)
            torch.testing.assert_close(sq.double().sum(), ref.square().sum(), rtol=1e-5, atol=0)
            torch.testing.assert_close(sq.double().sum((1, 2)), dw.double().square().sum((1, 2)), rtol=1e-6, atol=1e-9)
            assert sq[1].abs().max() == 0
            for config in ((16, 16, 16, 4, 2), (32, 16, 8, 4, 3)):
                dw_c, sq_c = torch.empty_like(dw), torch.full_like(sq, float("nan"))
                db_c = torch.empty_like(db) if gather_a else None
                W.launch(a, b, r.token, r.offsets, dw_c, db_c, 1, dtype == torch.float32, gather_a=gather_a,
                         gather_b=not gather_a, config=config, sq=sq_c)
                assert not sq_c.isnan().any(), config
                torch.testing.assert_close(sq_c.double().sum(), dw_c.double().square().sum(), rtol=1e-6, atol=0)
                tiles = dw_c.double().square()
                tiles = torch.nn.functional.pad(tiles, (0, -tiles.shape[2] % 16, 0, -tiles.shape[1] % 32))
                per_tile = tiles.view(E, tiles.shape[1] // config[0], config[0], -1, 16).sum((2, 4))
                if config[0] == 32:  # each program covers two slot rows: its sum in the first, 0 in the second
                    assert sq_c[:, 1::2].abs().max() == 0
                    torch.testing.assert_close(sq_c[:, 0::2].double(), per_tile[:, :sq_c[:, 0::2].shape[1]],
                                               rtol=1e-6, atol=1e-9)
                else:
                    torch.testing.assert_close(sq_c.double(), per_tile[:, :sq_c.shape[1]], rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        try:
            W.launch(x, g, r.token, r.offsets, torch.empty(E, d, H), None, 1, False, gather_a=True,
                     sq=torch.empty(E, 2, 2))
            raise AssertionError("a wrong sq shape was accepted")
        except ValueError as e:
            assert "sq has shape" in str(e)

    cfg = small(n_layers=3, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(4))
    doc = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])
    w_out = torch.linspace(-1, 1, 2 * 23 * cfg.d_model).view(2, 23, cfg.d_model)
    # eager fp32; compiled (bf16: _grouped_mm traces in bf16 only), with and without checkpointed blocks
    for compiled, checkpoint in ((False, False), (True, False), (True, True)):
        grads, known = {}, None
        for grad_sq in (False, True):
            torch._dynamo.reset()
            model = copy.deepcopy(m0)
            body = FastBody(model, compile=compiled, compile_backend="aot_eager", checkpoint=checkpoint,
                            dtype=torch.bfloat16 if compiled else torch.float32)
            body.grad_sq = grad_sq
            hidden, aux, _ = body(tokens, doc)
            ((hidden.float() * w_out).sum() + aux).backward()
            if compiled:
                assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
            grads[grad_sq] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            if grad_sq:
                known = body.known_grad_sq()
                experts = [p for n, p in model.named_parameters() if n.endswith(("w_up", "w_down"))]
                assert len(experts) == 2 * len(model.moe_layers()) >= 4
                assert set(known) == {id(p) for p in [*experts, model.embed.weight]}, (compiled, checkpoint)
                for p in [*experts, model.embed.weight]:
                    torch.testing.assert_close(known[id(p)].double().sum(), p.grad.double().square().sum(),
                                               rtol=1e-6, atol=0)
                fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.2, compile=False)
                every = torch.linalg.vector_norm(torch.stack([q.double().norm() for q in grads[True].values()]))
                torch.testing.assert_close(fast.grad_norm(known).double(), every, rtol=1e-6, atol=0)
                torch.testing.assert_close(fast.grad_norm({}).double(), every, rtol=1e-6, atol=0)
            else:
                assert body.known_grad_sq() == {}
        assert grads[True].keys() == grads[False].keys()
        for n in grads[False]:
            assert torch.equal(grads[True][n], grads[False][n]), (compiled, checkpoint, n)
    print("checked")


def test_triton_is_installed_for_these_tests():
    import triton  # noqa: F401  (pip install -e .[test])


@pytest.mark.parametrize("check", ["check_against_float64", "check_bf16_inputs", "check_compiled", "check_fast_body",
                                   "check_gathered_wgrad", "check_grad_sq"])
def test_in_triton_interpreter(check):
    run_in_interpreter("tests.test_moe_fused", check, timeout=900)


def test_bad_inputs_are_refused_with_the_shapes():
    from vpmoe.model import moe_fused as MF
    from vpmoe.model.kernels import sort_by_expert

    gen = torch.Generator().manual_seed(3)
    x, idx, weight, params = random_case(8, 32, 16, 4, 2, gen)
    _, order, offsets = sort_by_expert(idx, 4)
    with pytest.raises(ValueError, match="do not match x"):
        MF.moe_experts(x[:, :16], weight, order, offsets, *params, params[0], params[2])
    with pytest.raises(ValueError, match="int32"):
        MF.moe_experts(x, weight, order, offsets.long(), *params, params[0], params[2])
    with pytest.raises(ValueError, match="power of two"):
        MF.moe_experts(x, weight, order, offsets, torch.zeros(4, 32, 24), torch.zeros(4, 24),
                       torch.zeros(4, 24, 32), params[3], torch.zeros(4, 32, 24), torch.zeros(4, 24, 32))
    assert MF.supported(1024, 128) and not MF.supported(1024, 96)


def test_fast_body_takes_the_fused_experts_only_where_they_run():
    """On a CPU without the Triton interpreter, asking for them falls back to the grouped path."""
    from tests.test_model import small
    from vpmoe.model.fast import FastBody
    from vpmoe.model.model import VpMoE

    model = VpMoE(small(n_layers=2, d_model=32, expert_ffn=16, n_experts=8))
    assert FastBody(model, compile=False, fused_moe=True).fused_moe is False
    assert FastBody(model, compile=False).fused_moe is False


def test_grad_sq_without_triton_falls_back_to_reading_the_gradients():
    """Where the weight-gradient kernel does not run (a CPU without the Triton interpreter), FastBody's
    probes get no gradient, so `known_grad_sq` holds only the embedding's part (plain torch) and the
    optimizer's norm reads every other gradient; the gradients are those of a body without probes."""
    import copy

    from tests.test_model import randomize, small
    from vpmoe.model import moe_fused as MF
    from vpmoe.model.fast import FastBody
    from vpmoe.model.model import VpMoE

    assert not MF.available(torch.device("cpu"))  # this process runs without the interpreter
    cfg = small(n_layers=3, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = {}
    for grad_sq in (False, True):
        model = copy.deepcopy(m0)
        body = FastBody(model, compile=False, dtype=torch.float32)
        body.grad_sq = grad_sq
        hidden, aux, _ = body(tokens)
        (hidden.square().mean() + aux).backward()
        assert len(body.sq_probes) == (2 * len(model.moe_layers()) if grad_sq else 0) and model.moe_layers()
        known = body.known_grad_sq()
        assert set(known) == ({id(model.embed.weight)} if grad_sq else set())
        if grad_sq:
            torch.testing.assert_close(known[id(model.embed.weight)].double().sum(),
                                       model.embed.weight.grad.double().square().sum(), rtol=1e-6, atol=0)
        grads[grad_sq] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():  # a forward without gradients makes no probes and keeps no tokens
            body(tokens)
        assert body.sq_probes == [] and body.known_grad_sq() == {}
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])
    model.lm_head.weight = model.embed.weight  # tied: the head's gradient fills every row, so it is read
    body = FastBody(model, compile=False, dtype=torch.float32)
    body.grad_sq = True
    hidden, aux, _ = body(tokens)
    (hidden.square().mean() + aux).backward()
    assert body.known_grad_sq() == {}


def test_embedding_grad_sq_matches_float64():
    """`embedding_grad_sq` from a lookup's real backward (tokens repeated within and across rows, one
    token only at the table's last row): its sum equals the float64 ||grad||^2 of the whole table,
    each distinct row counted once; a non-zero row outside the tokens (a second backward's) would
    be missed, which is why it is used after one backward only."""
    from vpmoe.model.fast import embedding_grad_sq

    gen = torch.Generator().manual_seed(11)
    V, d = 97, 24
    weight = torch.randn(V, d, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 12, (3, 40), generator=gen)  # many repeats
    tokens[1, 5] = V - 1
    out = torch.nn.functional.embedding(tokens, weight)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    parts = embedding_grad_sq(weight.grad, tokens)
    assert parts.shape == (tokens.numel(),) and parts.dtype == torch.float32
    assert int((parts != 0).sum()) == len(tokens.unique())
    torch.testing.assert_close(parts.double().sum(), weight.grad.double().square().sum(), rtol=1e-6, atol=0)
    stray = weight.grad.clone()
    stray[50] = 1.0  # row 50 is not among the tokens
    assert float(embedding_grad_sq(stray, tokens).double().sum()) < float(stray.double().square().sum()) - d / 2


def check_wgrad_bench_launch() -> None:
    """bench/wgrad.py's launch (`wgrad.launch` at a forced tiling configuration instead of the
    autotuner's pick) gives `gathered_wgrad`'s result and its own fp32 reference's, both operand sides
    gathered, at two configurations and ragged expert groups; with the sums of squares (`--sq`) too."""
    from bench.wgrad import launch, reference
    from vpmoe.model import wgrad as W
    from vpmoe.model.kernels import Routing

    gen = torch.Generator().manual_seed(11)
    N, k, E, d, H = 24, 2, 5, 32, 16
    r = Routing(torch.rand(N, E, generator=gen).topk(k, -1).indices, E)
    x, g_rows = torch.randn(N, d, generator=gen), torch.randn(N * k, H, generator=gen)
    u, g_tok = torch.randn(N * k, H, generator=gen), torch.randn(N, d, generator=gen)
    for a, b, gather_a in ((x, g_rows, True), (u, g_tok, False)):
        ref = reference(a, b, r.token, r.offsets, gather_a)
        op_w, op_b, _ = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a)
        for config in ((16, 16, 16, 4, 2), (32, 16, 8, 4, 3)):
            dw = torch.full((E, a.shape[1], b.shape[1]), float("nan"))
            db = torch.full((E, H), float("nan")) if gather_a else None
            launch(config, a, b, r.token, r.offsets, dw, db, gather_a)
            torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dw, op_w, rtol=1e-5, atol=1e-5)
            if gather_a:
                torch.testing.assert_close(db, op_b, rtol=1e-5, atol=1e-5)
            # `--sq`: the same launch with the sums of squares, busiest first (the step's): the same dW,
            # every slot written, summing to ||dW||^2
            sq = torch.full(W.sq_shape(*dw.shape), float("nan"))
            dw_sq = torch.full_like(dw, float("nan"))
            launch(config, a, b, r.token, r.offsets, dw_sq, None, gather_a, W.busiest_first(r.offsets), sq)
            assert torch.equal(dw_sq, dw) and not sq.isnan().any(), config
            torch.testing.assert_close(sq.double().sum(), dw.double().square().sum(), rtol=1e-6, atol=0)
    print("checked")


def test_wgrad_bench_launch_matches_the_op_under_interpreter():
    run_in_interpreter("tests.test_moe_fused", "check_wgrad_bench_launch", timeout=600)


def test_wgrad_bench_lists_refuse_unknown_names():
    """bench/wgrad.py's --outs / --orders: a comma list of known names, else argparse's error naming the value."""
    import argparse

    from bench.wgrad import comma_list

    parse = comma_list("expert", "busiest")
    assert parse("busiest") == ["busiest"] and parse("expert,busiest") == ["expert", "busiest"]
    with pytest.raises(argparse.ArgumentTypeError, match="'busiest,x': a comma list of expert, busiest"):
        parse("busiest,x")

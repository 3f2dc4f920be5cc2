"""The dense weights cast once per forward (`dense_linear.DenseCopies`, `DENSE_COPIES`, the default for
bf16 bodies) against each block casting its own (`DENSE_COPIES` off): `_LinearParts` against
`linear` (the same function, one part) of the concatenation and float64, and whole bf16 fast bodies (eager, compiled,
checkpointed) bit-equal forward and backward, also after the masters change between forwards."""
import copy

import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.model import dense_linear as DL
from vpmoe.model.fast import FastBody
from vpmoe.model.model import VpMoE


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_parts_equals_the_cast_concatenation(x_dtype, bias):
    """Three weight parts of different heights (and their biases) given as one cast copy: the same
    output and input gradient bits as `linear` on the fp32 concatenation, each part's
    gradient its rows of that dW (fp32, within fp32 rounding of float64 of the rounded operands)."""
    gen = torch.Generator().manual_seed(3)
    dt = torch.bfloat16
    x = torch.randn(2, 29, 40, generator=gen).to(x_dtype)
    ws = [torch.randn(rows, 40, generator=gen) / 6 for rows in (24, 8, 16)]
    bs = [torch.randn(w.shape[0], generator=gen) for w in ws] if bias else []
    g = torch.randn(2, 29, 48, generator=gen).to(dt)

    x1 = x.clone().requires_grad_()
    parts = [t.clone().requires_grad_() for t in ws + bs]
    y1 = DL._LinearParts.call(x1, torch.cat(ws).to(dt), torch.cat(bs).to(dt) if bias else None, parts[:3], parts[3:])
    got = torch.autograd.grad(y1, [x1, *parts], g)

    x2 = x.clone().requires_grad_()
    w_cat = torch.cat(ws).requires_grad_()
    b_cat = torch.cat(bs).requires_grad_() if bias else None
    y2 = DL.linear(x2, w_cat, b_cat, dt)
    want = torch.autograd.grad(y2, [x2, w_cat] + ([b_cat] if bias else []), g)

    assert y1.dtype == dt and torch.equal(y1, y2)
    assert got[0].dtype == x_dtype and torch.equal(got[0], want[0])
    assert torch.equal(torch.cat(got[1:1 + len(ws)]), want[1])
    assert all(gw.shape == w.shape and gw.dtype == torch.float32 for gw, w in zip(got[1:], ws))
    ref_w = g.reshape(-1, 48).double().t() @ x.to(dt).reshape(-1, 40).double()
    assert _rel(torch.cat(got[1:1 + len(ws)]), ref_w) < 1e-6
    if bias:
        assert torch.equal(torch.cat(got[1 + len(ws):]), want[2])
        assert _rel(torch.cat(got[1 + len(ws):]), g.reshape(-1, 48).double().sum(0)) < 1e-6


def _run(model, body, tokens, doc, seed):
    """Forward + backward with fixed random output weights: (hidden, aux, {name: grad})."""
    model.zero_grad(set_to_none=True)
    hidden, aux, _ = body(tokens, doc)
    g = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed)).to(hidden.dtype)
    ((hidden.float() * g.float()).sum() + aux).backward()
    return hidden.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compiled,checkpoint", [(False, False), (True, False), (True, True)])
def test_fast_body_with_dense_copies_matches_casting(compiled, checkpoint, monkeypatch):
    """bf16 fast bodies with and without the copies: the same hidden state, aux loss and every
    gradient bit for bit, over a dense, local MoE and global MoE block (compiled with aot_eager
    too, and checkpointed); again after every master moved in place between forwards (the copies
    are cast afresh each forward); the copies are the masters' casts; a no-grad forward equal too."""
    cfg = small(n_layers=4, d_model=32, expert_ffn=16, n_experts=8)
    assert not cfg.is_moe(0) and cfg.is_global(3) and cfg.is_moe(1)
    base = randomize(VpMoE(cfg), seed=4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(5))
    doc = torch.tensor([[0] * 10 + [1] * 8, [0] * 4 + [1] * 14])
    calls = {"parts": 0, "f32": 0}
    parts_apply, linear = DL._LinearParts.call, DL.linear

    def counted(kind, fn):
        return lambda *a: calls.__setitem__(kind, calls[kind] + 1) or fn(*a)
    if not compiled:  # (a wrapped apply is no autograd.Function to Dynamo: it would break the graph)
        monkeypatch.setattr(DL._LinearParts, "call", counted("parts", parts_apply))
        monkeypatch.setattr(DL, "linear", counted("f32", linear))
    runs = []
    for keep in (False, True):
        monkeypatch.setattr(DL, "DENSE_COPIES", keep)
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        body = FastBody(model, compile=compiled, compile_backend="aot_eager", checkpoint=checkpoint,
                        dtype=torch.bfloat16)
        assert (body.dense_copies is not None) == keep
        before = dict(calls)
        first = _run(model, body, tokens, doc, 6)
        if keep and not compiled:  # eager: every dense linear through the copies, none casting
            assert calls["parts"] - before["parts"] == 4 * cfg.n_layers and calls["f32"] == before["f32"]
        with torch.no_grad():  # an optimizer step's worth of change to every master
            gen = torch.Generator().manual_seed(7)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        second = _run(model, body, tokens, doc, 8)
        with torch.no_grad():
            quiet = body(tokens, doc)[0]
        if compiled:  # no graph break, with grad or without (an evaluation's forward)
            assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
        if keep:
            for i, p in enumerate(body.params):
                for name, (ws, bs) in DL.dense_groups(cfg, i).items():
                    assert torch.equal(body.dense_copies.entries(i)[f"low.{name}.weight"],
                                       torch.cat([p[n] for n in ws]).bfloat16()), (i, name)
        runs.append((first, second, quiet))
    for (h0, a0, g0), (h1, a1, g1) in zip(runs[0][:2], runs[1][:2]):
        assert torch.equal(h0, h1) and torch.equal(a0, a1)
        assert g0.keys() == g1.keys() == {n for n, _ in base.named_parameters()} - {"lm_head.weight"}  # the loss's
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
    assert torch.equal(runs[0][2], runs[1][2])
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # the masters' change reached the forward


def test_no_copies_for_fp32_bodies_or_masters():
    """The copies serve half-precision GEMMs on fp32 masters only: an fp32 body keeps none."""
    model = randomize(VpMoE(small(n_layers=2)))
    assert FastBody(model, compile=False).dense_copies is None
    assert DL.wants_copies(torch.bfloat16, torch.float32) and not DL.wants_copies(torch.float32, torch.float32)
    assert not DL.wants_copies(torch.bfloat16, torch.bfloat16)
    body = FastBody(model, compile=False, dtype=torch.bfloat16)
    expected = sum(p.numel() for i, blk in enumerate(body.params) for ws, bs in DL.dense_groups(model.cfg, i).values()
                   for p in (blk[n] for n in ws + bs)) * 2
    assert body.dense_copies.nbytes() == expected


def test_router_copies_for_the_bf16x3_router():
    """With `router=True` (a body whose router runs bf16x3, on CUDA) every MoE block also keeps its
    router weight's bf16 cast, refreshed by the same `cast()`; dense blocks have none."""
    cfg = small(n_layers=3)
    model = randomize(VpMoE(cfg))
    body = FastBody(model, compile=False, dtype=torch.bfloat16)
    copies = DL.DenseCopies(cfg, body.params, torch.bfloat16, router=True)
    with torch.no_grad():
        model.layers[1].ffn.router.weight.mul_(1.5)  # a master changed before the cast
    copies.cast()
    for i, p in enumerate(body.params):
        low = copies.entries(i).get("low.ffn.router.weight")
        assert (low is not None) == cfg.is_moe(i)
        if low is not None:
            assert torch.equal(low, p["ffn.router.weight"].bfloat16())

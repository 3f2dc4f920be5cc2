"""The fast body's dense layers with fp32 weight gradients from the GEMM (`dense_linear.linear`,
under `dense_linear.F32_WEIGHT_GRADS`, the default) against float64 and against the plain cast-then-linear path."""
import copy

import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.model import dense_linear as DL
from vpmoe.model.model import VpMoE


def _grads(fn, x, w, b, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_f32_grads_against_float64_and_the_cast_path(x_dtype):
    """Same forward bits and input gradient as the plain path; the weight and bias gradients are the
    fp32 sums of the bf16-rounded operands (float64 of the same operands within fp32 rounding), where
    the plain path rounds the weight gradient to bf16 before widening it (~1e-3 off)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 48, generator=gen).to(x_dtype)
    w, b = torch.randn(40, 48, generator=gen) / 7, torch.randn(40, generator=gen)
    g = torch.randn(3, 37, 40, generator=gen).bfloat16()
    dt = torch.bfloat16
    y_new, (gx_new, gw_new, gb_new) = _grads(lambda x, w, b: DL.linear(x, w, b, dt), x, w, b, g)
    y_old, (gx_old, gw_old, gb_old) = _grads(
        lambda x, w, b: torch.nn.functional.linear(x.to(dt), w.to(dt), b.to(dt)), x, w, b, g)
    assert y_new.dtype == dt and torch.equal(y_new, y_old)
    assert gx_new.dtype == x_dtype and torch.equal(gx_new, gx_old)
    assert gw_new.dtype == gb_new.dtype == torch.float32
    rows_g, rows_x = g.reshape(-1, 40).double(), x.to(dt).reshape(-1, 48).double()
    ref_w, ref_b = rows_g.t() @ rows_x, rows_g.sum(0)
    assert rel(gw_new, ref_w) < 1e-6 and rel(gb_new, ref_b) < 1e-6, (rel(gw_new, ref_w), rel(gb_new, ref_b))
    assert rel(gw_old, ref_w) > 10 * rel(gw_new, ref_w), (rel(gw_old, ref_w), rel(gw_new, ref_w))
    assert rel(gb_old, ref_b) < 1e-2  # the plain path's bias gradient: bf16-rounded sums
    # no bias: the same weight gradient, and no bias gradient asked
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    y = DL.linear(leaves[0], leaves[1], None, dt)
    gx, gw = torch.autograd.grad(y, leaves, g)
    assert torch.equal(gw, gw_new) and torch.equal(gx, gx_new)


def test_fast_body_bf16_with_f32_weight_grads(monkeypatch):
    """A bf16 fast body (eager, CPU) with the flag: every dense linear goes through the function, the
    forward is bit-identical, and every gradient stays within bf16 rounding of the flag-off run's."""
    from vpmoe.model.fast import FastBody

    cfg = small(n_layers=3)
    base = randomize(VpMoE(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 3 + [1] * 17])
    monkeypatch.setattr(DL, "DENSE_COPIES", False)  # each block casts (the copies: tests/test_dense_copies.py)
    calls = []
    call = DL._LinearParts.call
    monkeypatch.setattr(DL._LinearParts, "call", lambda *a: calls.append(a[1].shape) or call(*a))
    runs = []
    for flag in (False, True):
        monkeypatch.setattr(DL, "F32_WEIGHT_GRADS", flag)
        model = copy.deepcopy(base)
        hidden, aux, _ = FastBody(model, compile=False, dtype=torch.bfloat16)(ids, doc)
        g = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2)).to(hidden.dtype)
        ((hidden.float() * g.float()).sum() + aux).backward()
        runs.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    # per block: the attention projection and output, and the dense or shared FFN's two
    assert len(calls) == 4 * cfg.n_layers, calls
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys()
    for name, old in runs[0][1].items():
        new = runs[1][1][name]
        assert new.dtype == old.dtype and rel(new, old) < 2e-2, (name, rel(new, old))


"""The router's selection kernels (vpmoe/model/route_fused.py) against `kernels.select_experts` +
`model.sequence_aux_loss` in fp32 (the same selections) and float64 (weights, aux loss and the
logits' gradient), on the CPU through the Triton interpreter (each check in a fresh process, see
tests/triton_interpreter.py). The GPU runs them compiled: tests/gpu/test_gpu_fast_paths.py."""
from types import SimpleNamespace

import pytest
import torch

from tests.triton_interpreter import run_in_interpreter


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cfg(aux_loss_coef=1e-4, E=64, G=8, k=4, kept_groups=4):
    return SimpleNamespace(n_experts=E, n_groups=G, topk_groups=kept_groups, top_k=k, route_scale=2.5,
                           aux_loss_coef=aux_loss_coef)


def _reference(logits, bias, cfg, B):
    """idx, weights, aux, load by the torch path (`select_experts`, `sequence_aux_loss`) in logits' dtype."""
    from vpmoe.model import kernels as K
    from vpmoe.model import model as M

    idx, weight, scores = K.select_experts(torch.sigmoid(logits), bias.to(logits.dtype), cfg)
    aux = M.sequence_aux_loss(scores, idx, B, cfg)
    return idx, weight, aux, torch.bincount(idx.flatten(), minlength=cfg.n_experts)


def check_against_reference() -> None:
    """3 rows of 45 tokens (the interpreter's programs take 16: a partial block per row), 64
    experts in 8 groups, top 4 of the 4 best groups (vpMoE's rule: with one expert per group score
    that is the plain top 4) and of the 3 best (where the group limit changes selections); logits
    over a wide range, a bias that moves selections. Selections and loads equal the fp32 torch
    path's; weights, aux loss and the logits' gradient (from random weights' gradients and the aux
    loss) match float64; with the aux loss off the gradient comes from the weights alone."""
    from vpmoe.model import route_fused as RS

    g = torch.Generator().manual_seed(3)
    B, T, cfg = 3, 45, _cfg()
    assert RS.applies(torch.zeros(1, 64), cfg)
    logits = torch.randn(B * T, 64, generator=g, dtype=torch.float64) * 2
    bias = (torch.rand(64, generator=g) - 0.5) * 0.2
    gw = torch.randn(B * T, 4, generator=g, dtype=torch.float64)
    c_aux = 3.0
    for coef, kept in ((1e-4, 4), (1e-4, 3), (0.0, 3)):
        cfg = _cfg(coef, kept_groups=kept)
        x = logits.float().requires_grad_(True)
        idx, weight, prob_part, count_part = RS.route_select(x, bias, T, 4, 8, kept, 2.5)
        plain = (torch.sigmoid(logits.float()) + bias).topk(4, dim=-1).indices
        assert torch.equal(idx, plain) == (kept == 4)  # 3 groups: some rows lose an expert to the limit
        aux, load = RS.stats_from_parts(prob_part, count_part, B, T, cfg)
        assert prob_part.shape == count_part.shape == (B * 3, 64)
        idx32, _, _, load32 = _reference(logits.float(), bias, cfg, B)
        assert torch.equal(idx, idx32) and torch.equal(load, load32) and load.sum() == B * T * 4
        x64 = logits.clone().requires_grad_(True)
        idx64, w64, aux64, _ = _reference(x64, bias, cfg, B)
        assert torch.equal(idx, idx64)
        assert _rel(weight, w64) < 1e-6, _rel(weight, w64)
        loss = (weight.double() * gw).sum()
        loss64 = (w64 * gw).sum()
        if coef > 0:
            assert abs(aux.item() - aux64.item()) < 1e-6 * aux64.item(), (aux.item(), aux64.item())
            loss, loss64 = loss + c_aux * aux, loss64 + c_aux * aux64
        else:
            assert aux.item() == 0.0
        loss.backward()
        loss64.backward()
        assert _rel(x.grad, x64.grad) < 1e-5, _rel(x.grad, x64.grad)
        # the aux loss's part alone is tiny against the weights' (1e-4 scale): check it on its own
        if coef > 0:
            x.grad = None
            x64.grad = None
            RS.stats_from_parts(*RS.route_select(x, bias, T, 4, 8, kept, 2.5)[2:], B, T, cfg)[0].backward()
            _reference(x64, bias, cfg, B)[2].backward()
            assert _rel(x.grad, x64.grad) < 1e-5, _rel(x.grad, x64.grad)
    print("checked")


def check_route_with_stats_paths_agree() -> None:
    """`route_with_stats` from x and the router weight, kernel (`ROUTE_KERNEL`) against the torch
    path: the same selections and loads, weights and aux loss and the gradients of x, the weight and
    nothing for the bias (a buffer) to fp32 rounding."""
    from vpmoe.model import route_fused as RS

    g = torch.Generator().manual_seed(4)
    B, T, d, cfg = 2, 40, 24, _cfg()
    x0 = torch.randn(B * T, d, generator=g)
    w0 = torch.randn(64, d, generator=g) * 0.3
    bias = (torch.rand(64, generator=g) - 0.5) * 0.1
    gw = torch.randn(B * T, 4, generator=g)
    outs = []
    for on in (False, True):
        RS.ROUTE_KERNEL = on
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        idx, weight, aux, load = RS.route_with_stats(x, w, bias, cfg, B)
        ((weight * gw).sum() + 50 * aux).backward()
        outs.append((idx, weight, aux, load, x.grad, w.grad))
    (i0, w0_, a0, l0, gx0, gw0), (i1, w1, a1, l1, gx1, gw1) = outs
    assert torch.equal(i0, i1) and torch.equal(l0, l1)
    assert _rel(w1, w0_) < 1e-6 and abs(a1.item() - a0.item()) < 1e-6 * a0.item()
    assert _rel(gx1, gx0) < 1e-5 and _rel(gw1, gw0) < 1e-5, (_rel(gx1, gx0), _rel(gw1, gw0))
    print("checked")


def check_fast_body_step_with_the_kernels() -> None:
    """A whole fp32 FastBody step (tests/test_model.py's small model: 8 experts, top 2 of 2 groups'
    best) with `ROUTE_KERNEL` on against off: hidden states, aux loss, loads and every gradient."""
    import copy

    from tests.test_model import (
        assert_same_fast_body_step,
        fast_body_step,
        randomize,
        small,
    )
    from vpmoe.model import route_fused as RS
    from vpmoe.model.model import VpMoE

    model = randomize(VpMoE(small(n_layers=3)))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 3 + [1] * 17])
    RS.ROUTE_KERNEL = False
    _, want = fast_body_step(copy.deepcopy(model), ids, doc, fused_prologue=False)
    RS.ROUTE_KERNEL = True
    _, got = fast_body_step(model, ids, doc, fused_prologue=False)
    assert got[1] > 0 and got[2].sum() == 2 * 20 * 2 * 2  # the aux loss on; 2 MoE layers x 40 tokens x top 2
    assert_same_fast_body_step(got, want)
    print("checked")


@pytest.mark.parametrize("check", ["check_against_reference", "check_route_with_stats_paths_agree",
                                   "check_fast_body_step_with_the_kernels"])
def test_in_triton_interpreter(check):
    run_in_interpreter("tests.test_route_fused", check, timeout=600)


def test_applies_only_to_power_of_two_single_expert_groups(monkeypatch):
    """What the kernels do not serve falls back to the torch path: a size that is not a power of two,
    two experts per group score, fp64 logits, the CPU without the interpreter (this process)."""
    from vpmoe.model import route_fused as RS

    logits = torch.zeros(4, 64)
    assert not RS.applies(logits, _cfg())  # CPU, no interpreter in this process
    monkeypatch.setattr(RS, "available", lambda device: True)  # the shape rules alone
    assert RS.applies(logits, _cfg())
    assert not RS.applies(torch.zeros(4, 48), _cfg(E=48, G=8))  # 6 experts a group
    assert not RS.applies(logits, SimpleNamespace(**{**vars(_cfg()), "top_k": 4, "topk_groups": 2}))
    assert not RS.applies(logits.double(), _cfg())

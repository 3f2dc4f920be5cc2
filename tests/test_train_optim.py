"""Muon + AdamW and the WSD schedule against independent references (SVD, torch.optim.AdamW,
per-matrix Muon, hand-computed momentum and lr values)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpmoe.config import ModelConfig
from vpmoe.train.optim import MuonAdamW, OptimConfig, build_optimizer, muon_scale, newton_schulz, split_params
from vpmoe.train.schedule import ScheduleConfig, wsd_factor

TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=8, window=4,
                   dense_ffn=16, n_experts=8, expert_ffn=8, shared_ffn=8, top_k=2, n_groups=2, topk_groups=2,
                   max_seq_len=32)


def muon(params, lr=0.1, momentum=0.9, wd=0.0):
    return MuonAdamW([dict(params=params, kind="muon", lr=lr, base_lr=lr, weight_decay=wd, momentum=momentum,
                           nesterov=True, ns_steps=5)])


@pytest.mark.parametrize("shape", [(6, 16, 8), (5, 8, 24)])
def test_muon_batch_of_expert_matrices_equals_per_matrix_updates(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    batched = nn.Parameter(w0.clone())
    singles = [nn.Parameter(w0[e].clone()) for e in range(shape[0])]
    opt_b, opt_s = muon([batched], wd=0.01), muon(singles, wd=0.01)
    for g in grads:  # several steps, so momentum state is exercised too
        batched.grad = g.clone()
        for e, p in enumerate(singles):
            p.grad = g[e].clone()
        opt_b.step()
        opt_s.step()
    for e, p in enumerate(singles):
        torch.testing.assert_close(batched.data[e], p.data, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(batched.data, w0)


def test_newton_schulz_approximates_the_polar_factor():
    """NS(G) = U S' V^T with G = U S V^T: U^T NS(G) V is diagonal; entries are near 1 except for
    singular values so small (relative to ||G||_F) that 5 iterations cannot lift them (Muon's
    known behaviour), which stay positive."""
    torch.manual_seed(1)
    for shape in [(32, 16), (16, 48), (4, 24, 24)]:
        g = torch.randn(shape) * 3.0
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        core = u.mT @ newton_schulz(g) @ vh.mT
        diag = torch.diagonal(core, dim1=-2, dim2=-1)
        off = core - torch.diag_embed(diag)
        assert off.abs().max() < 1e-4, shape
        relative = s / g.norm(dim=(-2, -1), keepdim=True)[..., 0]
        big = diag[relative > 1e-2]
        assert big.min() > 0.6 and diag.max() < 1.3, (shape, big.min(), diag.max())
        assert diag.min() > 0


def test_muon_momentum_nesterov_and_scale_by_hand():
    torch.manual_seed(2)
    w0, g1, g2 = torch.randn(8, 12), torch.randn(8, 12), torch.randn(8, 12)
    lr, mu, wd = 0.05, 0.9, 0.1
    p = nn.Parameter(w0.clone())
    opt = muon([p], lr=lr, momentum=mu, wd=wd)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    scale = 0.2 * math.sqrt(12)
    w1 = w0 * (1 - lr * wd) - lr * scale * newton_schulz(g1 + mu * g1)
    buf2 = mu * g1 + g2
    w2 = w1 * (1 - lr * wd) - lr * scale * newton_schulz(g2 + mu * buf2)
    torch.testing.assert_close(p.data, w2, rtol=1e-6, atol=1e-7)
    assert muon_scale(torch.Size([8, 12])) == pytest.approx(scale)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(3)
    shapes = [(7,), (3, 5), ()]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([dict(params=ours, kind="adamw", lr=0.01, base_lr=0.01, weight_decay=0.1,
                          betas=(0.9, 0.95), eps=1e-8)])
    torch_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)


def test_param_split_rules():
    from vpmoe.model.model import VpMoE

    model = VpMoE(TINY)
    muon_names = {n for n, _ in split_params(model)[0]}
    adamw_names = {n for n, _ in split_params(model)[1]}
    assert muon_names.isdisjoint(adamw_names)
    assert muon_names | adamw_names == {n for n, _ in model.named_parameters()}
    for name in ("layers.1.ffn.w_up", "layers.1.ffn.w_down", "layers.1.ffn.router.weight",
                 "layers.0.attn.a_q.weight", "layers.3.attn.wq.weight", "layers.0.ffn.up.weight",
                 "layers.1.ffn.shared.down.weight", "layers.3.attn.wo.weight"):
        assert name in muon_names, name
    for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.1.ffn.b_up", "layers.1.ffn.b_down",
                 "layers.0.attn.sinks", "layers.0.attn.log_freq", "layers.1.attn.value_mix",
                 "layers.0.attn.q_bias", "layers.3.attn.wq.bias", "layers.0.attn.q_norm.weight"):
        assert name in adamw_names, name
    assert all(p.ndim >= 2 for _, p in split_params(model)[0])
    without_router = {n for n, _ in split_params(model, router_muon=False)[1]}
    assert "layers.1.ffn.router.weight" in without_router
    opt = build_optimizer(model, OptimConfig(lr=0.02, adamw_lr=0.004))
    assert {g["kind"]: g["base_lr"] for g in opt.param_groups} == {"muon": 0.02, "adamw": 0.004}


def test_wsd_schedule_by_hand():
    cfg = ScheduleConfig(warmup_steps=4, decay_fraction=0.25, min_lr_ratio=0.1, decay_shape="linear")
    total = 20  # warmup steps 0..3, stable 4..14, decay 15..19 (5 steps)
    assert [wsd_factor(s, total, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(wsd_factor(s, total, cfg) == 1.0 for s in range(4, 15))
    assert [round(wsd_factor(s, total, cfg), 10) for s in range(15, 20)] == [0.82, 0.64, 0.46, 0.28, 0.1]
    sqrt_cfg = ScheduleConfig(warmup_steps=0, decay_fraction=0.5, decay_shape="sqrt")
    assert wsd_factor(5, 10, sqrt_cfg) == pytest.approx(1 - math.sqrt(1 / 5))
    assert wsd_factor(9, 10, sqrt_cfg) == 0.0
    cos_cfg = ScheduleConfig(warmup_steps=0, decay_fraction=1.0, decay_shape="cosine")
    assert wsd_factor(1, 4, cos_cfg) == pytest.approx(0.5)  # progress 2/4 -> cos(pi/2)


def test_bad_optim_and_schedule_values_are_named():
    from vpmoe.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="optim.muon_momentum"):
        from_dict(OptimConfig, {"muon_momentum": 1.5}, "optim")
    with pytest.raises(ConfigError, match="schedule.decay_shape"):
        from_dict(ScheduleConfig, {"decay_shape": "step"}, "schedule")

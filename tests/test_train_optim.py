"""Muon + AdamW and the WSD schedule against independent references (SVD, torch.optim.AdamW,
per-matrix Muon, hand-computed momentum and lr values)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpmoe.config import ConfigError, ModelConfig
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


def _random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.1


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_momentum_is_the_rounded_fp32_recurrence(fast, tmp_path):
    """muon_momentum_dtype = bfloat16: the stored momentum is bf16 and equals, bit for bit, the
    recurrence m = bf16(mu * m + g) computed in fp32 from the stored value (an independent loop
    over the same gradients); AdamW state stays fp32; the weights move as with fp32 momentum up to
    that rounding; a checkpoint round trip keeps the dtype and the values."""
    import copy

    from vpmoe.model.model import VpMoE
    from vpmoe.train import checkpoint as ckpt
    from vpmoe.train.optim_fast import FastMuonAdamW

    torch.manual_seed(0)
    m16 = VpMoE(TINY)
    m32 = copy.deepcopy(m16)
    o16 = build_optimizer(m16, OptimConfig(lr=0.02, muon_momentum_dtype="bfloat16", adamw_moments_dtype="float32"))
    o32 = build_optimizer(m32, OptimConfig(lr=0.02, muon_momentum_dtype="float32", adamw_moments_dtype="float32"))
    step16 = FastMuonAdamW(o16).step if fast else o16.step
    step32 = FastMuonAdamW(o32).step if fast else o32.step
    muon_params = {id(p) for p in o16.param_groups[0]["params"]}
    mirror = {name: torch.zeros_like(p, dtype=torch.bfloat16) for name, p in m16.named_parameters()}
    w0 = [p.detach().clone() for p in m16.parameters()]
    for seed in range(3):
        _random_grads(m16, seed)
        _random_grads(m32, seed)
        for name, p in m16.named_parameters():
            if id(p) in muon_params:
                mirror[name] = (mirror[name].float() * 0.95 + p.grad).bfloat16()
        step16()
        step32()
    for (name, p), p32, p0 in zip(m16.named_parameters(), m32.parameters(), w0):
        state = o16.state[p]
        if id(p) in muon_params:
            assert state["momentum"].dtype == torch.bfloat16 and o32.state[p32]["momentum"].dtype == torch.float32
            assert torch.equal(state["momentum"], mirror[name]), name
            err = (p - p32).norm() / (p32 - p0).norm()
            assert err < 0.05, (name, float(err))  # same step up to the momentum's rounding
        else:
            assert state["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(p, p32, rtol=1e-6, atol=1e-7)
    saved = ckpt.save_checkpoint(tmp_path, 3, m16, o16, {"step": 3, "tokens": 0, "elapsed": 0.0}, {}, {}, keep=1)
    m_new = VpMoE(TINY)
    o_new = build_optimizer(m_new, OptimConfig(lr=0.02, muon_momentum_dtype="bfloat16", adamw_moments_dtype="float32"))
    ckpt.load_checkpoint(saved, m_new, o_new)
    for (name, p), q in zip(m16.named_parameters(), m_new.parameters()):
        if id(p) in muon_params:
            a, b = o16.state[p]["momentum"], o_new.state[q]["momentum"]
            assert b.dtype == torch.bfloat16 and torch.equal(a, b), name


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_adamw_moments_are_the_rounded_fp32_recurrences(fast, tmp_path):
    """adamw_moments_dtype = bfloat16: the embedding's and head's AdamW moments (their own group)
    are stored in bf16 and equal, bit for bit, m = bf16(lerp(m, g, 1 - b1)) and
    v = bf16(b2 v + (1 - b2) g^2) computed in fp32 from the stored values (an independent loop);
    every other tensor's state and step are the fp32-moment run's; those two tables move as
    with fp32 moments up to that rounding; a checkpoint round trip keeps the dtype and values, and
    an fp32-moment checkpoint resumed with bf16 configured stores its moments rounded once."""
    import copy

    from vpmoe.model.model import VpMoE
    from vpmoe.train import checkpoint as ckpt
    from vpmoe.train.optim import ADAMW_ONLY
    from vpmoe.train.optim_fast import FastMuonAdamW

    torch.manual_seed(0)
    m16 = VpMoE(TINY)
    m32 = copy.deepcopy(m16)
    o16 = build_optimizer(m16, OptimConfig(adamw_moments_dtype="bfloat16"))
    o32 = build_optimizer(m32, OptimConfig(adamw_moments_dtype="float32"))
    assert [g["kind"] for g in o16.param_groups] == ["muon", "adamw", "adamw"]
    assert [n for n, p in m16.named_parameters() if any(p is q for q in o16.param_groups[2]["params"])] == \
        sorted(ADAMW_ONLY)
    step16 = FastMuonAdamW(o16).step if fast else o16.step
    step32 = FastMuonAdamW(o32).step if fast else o32.step
    m_ref = copy.deepcopy(m32)  # the reference step with bf16 moments, for the fast one
    o_ref = build_optimizer(m_ref, OptimConfig(adamw_moments_dtype="bfloat16"))
    mirror = {n: (torch.zeros_like(p, dtype=torch.bfloat16), torch.zeros_like(p, dtype=torch.bfloat16))
              for n, p in m16.named_parameters() if n in ADAMW_ONLY}
    w0 = [p.detach().clone() for p in m16.parameters()]
    for seed in range(3):
        _random_grads(m16, seed)
        _random_grads(m32, seed)
        _random_grads(m_ref, seed)
        o_ref.step()
        for name, (m, v) in mirror.items():
            g = dict(m16.named_parameters())[name].grad
            mirror[name] = (m.float().lerp(g, 0.1).bfloat16(), v.float().mul(0.95).addcmul(g, g, value=0.05).bfloat16())
        step16()
        step32()
    for (name, p), p32, p0, p_ref in zip(m16.named_parameters(), m32.parameters(), w0, m_ref.parameters()):
        state = o16.state[p]
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)  # fast == reference (the update unrounded)
        if name in ADAMW_ONLY:
            assert (state["exp_avg"].dtype, state["exp_avg_sq"].dtype) == (torch.bfloat16, torch.bfloat16), name
            assert torch.equal(state["exp_avg"], mirror[name][0]) and torch.equal(state["exp_avg_sq"], mirror[name][1])
            err = (p - p32).norm() / (p32 - p0).norm()
            assert 0 < err < 0.02, (name, float(err))  # the same step up to the moments' rounding
        else:
            assert all(t.dtype == o32.state[p32][k].dtype for k, t in state.items()), name  # only the tables differ
            torch.testing.assert_close(p, p32, rtol=1e-6, atol=1e-7)
    saved = ckpt.save_checkpoint(tmp_path / "a", 3, m16, o16, {"step": 3, "tokens": 0, "elapsed": 0.0}, {}, {}, keep=1)
    saved32 = ckpt.save_checkpoint(tmp_path / "b", 3, m32, o32, {"step": 3, "tokens": 0, "elapsed": 0.0}, {}, {},
                                   keep=1)
    for path, source, settings in ((saved, o16, []), (saved32, o32, ["adamw.state_dtype 'float32' -> 'bfloat16'"])):
        m_new = VpMoE(TINY)
        o_new = build_optimizer(m_new, OptimConfig(adamw_moments_dtype="bfloat16"))
        ckpt.load_checkpoint(path, m_new, o_new)
        assert o_new.changed_on_load == settings
        for p, q in zip(source.param_groups[2]["params"], o_new.param_groups[2]["params"]):
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = source.state[p][key], o_new.state[q][key]
                assert b.dtype == torch.bfloat16 and torch.equal(b, a.bfloat16()), key


def test_momentum_dtype_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="muon_momentum_dtype: expected one of"):
        OptimConfig(muon_momentum_dtype="fp8").validate()
    with pytest.raises(ConfigError, match="adamw_moments_dtype: expected one of"):
        OptimConfig(adamw_moments_dtype="float16").validate()


def test_resume_uses_the_configs_optimizer_settings(tmp_path):
    """Loading a checkpoint keeps the state tensors but this run's settings: a checkpoint written
    with fp32 momentum and weight decay 0.1, loaded by an optimizer configured with bf16 momentum
    and decay 0.05, has bf16 momentum equal to the saved one rounded once, decay 0.05, and names
    both changes in `changed_on_load`; the reverse (bf16 -> fp32) is exact and lists no change
    when the settings agree."""
    from vpmoe.model.model import VpMoE
    from vpmoe.train import checkpoint as ckpt

    torch.manual_seed(0)
    model = VpMoE(TINY)
    opt = build_optimizer(model, OptimConfig(lr=0.02, muon_weight_decay=0.1, muon_momentum_dtype="float32"))
    for seed in range(2):
        _random_grads(model, seed)
        opt.step()
    saved = ckpt.save_checkpoint(tmp_path / "a", 2, model, opt, {"step": 2, "tokens": 0, "elapsed": 0.0}, {}, {},
                                 keep=1)
    muon = opt.param_groups[0]["params"]
    m16 = VpMoE(TINY)
    o16 = build_optimizer(m16, OptimConfig(lr=0.02, muon_weight_decay=0.05, muon_momentum_dtype="bfloat16"))
    ckpt.load_checkpoint(saved, m16, o16)
    assert o16.param_groups[0]["weight_decay"] == 0.05 and o16.param_groups[0]["momentum_dtype"] == "bfloat16"
    assert sorted(o16.changed_on_load) == ["muon.momentum_dtype 'float32' -> 'bfloat16'",
                                           "muon.weight_decay 0.1 -> 0.05"]
    for p, q in zip(muon, o16.param_groups[0]["params"]):
        a, b = opt.state[p]["momentum"], o16.state[q]["momentum"]
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and torch.equal(b, a.bfloat16())
    saved16 = ckpt.save_checkpoint(tmp_path / "b", 2, m16, o16, {"step": 2, "tokens": 0, "elapsed": 0.0}, {}, {},
                                   keep=1)
    m32 = VpMoE(TINY)
    o32 = build_optimizer(m32, OptimConfig(lr=0.02, muon_weight_decay=0.05, muon_momentum_dtype="float32"))
    ckpt.load_checkpoint(saved16, m32, o32)
    assert o32.changed_on_load == ["muon.momentum_dtype 'bfloat16' -> 'float32'"]
    for p, q in zip(o16.param_groups[0]["params"], o32.param_groups[0]["params"]):
        a, b = o16.state[p]["momentum"], o32.state[q]["momentum"]
        assert b.dtype == torch.float32 and torch.equal(b, a.float())


def test_optimizer_streams_follow_activation_checkpointing():
    """One stream wherever blocks are checkpointed (a bool or a block count), FastMuonAdamW's
    default elsewhere; the trainer and bench/train_step.py both build from this rule."""
    import inspect

    from vpmoe.train.optim_fast import FastMuonAdamW, streams_for

    default = inspect.signature(FastMuonAdamW).parameters["streams"].default
    assert default > 1
    for setting, want in ((True, 1), (50, 1), (1, 1), (False, default), (0, default)):
        assert streams_for(setting).get("streams", default) == want, setting


def test_gram_kernel_setting_reaches_packed_newton_schulz():
    """`FastMuonAdamW.gram_kernel`: on by default, off when asked; every packed Newton-Schulz call
    of a step gets that setting (the kernel runs where `ns_gram.applies`: CUDA, fp16, n <= 128)."""
    from tests.test_kernels import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim_fast import FastMuonAdamW

    model = randomize(VpMoE(small()))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for given, want in (({}, True), ({"gram_kernel": True}, True), ({"gram_kernel": False}, False)):
        fast = FastMuonAdamW(build_optimizer(model, OptimConfig()), ns_pack=2, **given)
        seen, packed = [], fast._ns_packed
        fast._ns_packed = lambda us, steps, kernel, seen=seen, packed=packed: (
            seen.append(kernel) or packed(us, steps, kernel=kernel))
        fast.step()
        fast.step()
        assert fast.gram_kernel is want
        assert len(seen) >= 2 and set(seen) == {want}, (given, seen)


def test_job_orders_give_the_same_step():
    """`FastMuonAdamW(order=...)`: the AdamW jobs run before the Muon ones (the default) or after them,
    and the order changes nothing else: two steps leave every parameter and state bit-equal."""
    import copy

    from tests.test_kernels import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim_fast import FastMuonAdamW

    base = randomize(VpMoE(small()))
    runs = {}
    for order in ("adamw_first", "muon_first"):
        model = copy.deepcopy(base)
        opt = build_optimizer(model, OptimConfig(lr=0.02))
        # "adamw_first" left unnamed: the default itself is what is checked
        fast = FastMuonAdamW(opt, max_grad_norm=1.0, **({"order": order} if order == "muon_first" else {}))
        log = []
        for kind in ("_muon", "_adamw"):  # each job notes its kind when it runs
            made = getattr(fast, kind)
            setattr(fast, kind, lambda *a, made=made, kind=kind, log=log: [
                (lambda job=job, log=log: log.append(kind) or job()) for job in made(*a)])
        for seed in range(2):
            _random_grads(model, seed)
            fast.step()
        half = len(log) // 2
        kinds = ["_adamw", "_muon"] if order == "adamw_first" else ["_muon", "_adamw"]
        assert log[:half] == sorted(log[:half], key=kinds.index) and set(log) == set(kinds), (order, log)
        runs[order] = model, opt
    (m1, o1), (m2, o2) = runs["adamw_first"], runs["muon_first"]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        for key, value in o1.state[p].items():
            assert torch.equal(value, o2.state[q][key]), key


def test_unknown_job_order_is_refused():
    from tests.test_kernels import randomize, small
    from vpmoe.model.model import VpMoE
    from vpmoe.train.optim_fast import FastMuonAdamW

    opt = build_optimizer(randomize(VpMoE(small())), OptimConfig(lr=0.02))
    with pytest.raises(ValueError, match="order"):
        FastMuonAdamW(opt, max_grad_norm=1.0, order="adamw_last")

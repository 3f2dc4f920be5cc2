"""GPU fast paths against the reference, forward and backward, bf16 tolerances.

Run on the GPU machine (bench/gpu_run.sh runs it); CI has no GPU, so this folder is excluded there
by tests/gpu/conftest.py unless CUDA is present.
"""
import dataclasses

import pytest
import torch

from vpmoe.config import load_model_config
from vpmoe.model import kernels as K
from vpmoe.model.model import MoE, VpMoE, alibi_slopes, attention_reference, experts_loop, positions_from_docs

DEV = "cuda"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("window,alibi", [(128, False), (None, True)])
def test_flex_attention_matches_reference(window, alibi):
    torch.manual_seed(0)
    B, H, G, T, D = 2, 8, 2, 1024, 128
    doc = torch.zeros(B, T, dtype=torch.long, device=DEV)
    doc[0, 300:] = 1
    doc[0, 700:] = 2
    doc[1, 900:] = 1
    pos = positions_from_docs(doc)
    q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, G, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, G, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(H, device=DEV, requires_grad=True)
    slopes = alibi_slopes(H).to(DEV) if alibi else None
    grads = []
    for fn in (attention_reference, K.attention_flex):
        for t in (q, k, v, sinks):
            t.grad = None
        out = fn(q, k, v, sinks, pos, pos, doc, doc, window, slopes)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v, sinks)])
    for name, ref, got in zip(["out", "dq", "dk", "dv", "dsink"], *grads):
        assert rel_err(got, ref) < 2e-2, (name, rel_err(got, ref))


def test_grouped_experts_match_loop_bf16():
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=2)
    torch.manual_seed(0)
    moe = MoE(cfg).to(DEV)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(4096, cfg.d_model, device=DEV, requires_grad=True)
    outs = []
    for fn in (experts_loop, K.experts_grouped):
        moe.dispatcher = fn
        moe.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, load = moe(x.view(2, 2048, -1))
        (y.float() * torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)).sum().backward()
        outs.append([y.detach(), x.grad.clone(), moe.w_up.grad.clone(), moe.b_up.grad.clone(), moe.router.weight.grad.clone()])
    for name, ref, got in zip(["y", "dx", "dw_up", "db_up", "drouter"], *outs):
        assert rel_err(got, ref) < 2e-2, (name, rel_err(got, ref))


def _pair(cfg, decisive_router: bool):
    torch.manual_seed(0)
    ref = VpMoE(cfg).to(DEV)
    if decisive_router:  # bf16 noise must not flip near-tied expert choices between the two paths
        with torch.no_grad():
            for m in ref.moe_layers():
                m.router.weight.normal_(0, 0.2)
    fast = VpMoE(cfg).to(DEV)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(m, ids, doc, autocast: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = m(ids, doc_ids=doc)
    V = out.logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(out.logits.float().view(-1, V), ids.roll(-1, 1).view(-1))
    (loss + out.aux_loss).backward()
    return [out.logits.detach(), m.layers[1].attn.a_q.weight.grad, m.layers[3].attn.wq.weight.grad,
            m.layers[2].ffn.w_down.grad, m.embed.weight.grad], out


NAMES = ["logits", "d a_q", "d wq", "d w_down", "d embed"]


def test_full_model_flex_attention_fp32():
    """fp32: Flex attention inside the whole model (masks shared across layers, value residual, docs)."""
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=4, n_experts=64, vocab_size=4096)
    ref, fast = _pair(cfg, decisive_router=False)
    fast.set_impl(attention="flex")
    ids = torch.randint(0, 4096, (2, 1024), device=DEV)
    doc = torch.zeros_like(ids)
    doc[:, 600:] = 1
    torch.backends.cuda.matmul.allow_tf32 = False
    a, _ = _run(ref, ids, doc, False)
    b, _ = _run(fast, ids, doc, False)
    for name, x, y in zip(NAMES, a, b):
        assert rel_err(y, x) < 1e-3, (name, rel_err(y, x))


def test_full_model_all_fast_paths_compiled_bf16():
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=4, n_experts=64, vocab_size=4096)
    ref, fast = _pair(cfg, decisive_router=True)
    K.use_fast_paths(fast)
    for block in fast.layers:
        block.compile(dynamic=False)
    ids = torch.randint(0, 4096, (2, 1024), device=DEV)
    doc = torch.zeros_like(ids)
    doc[:, 600:] = 1
    a, out_a = _run(ref, ids, doc, True)
    b, out_b = _run(fast, ids, doc, True)
    agree = (out_a.expert_load - out_b.expert_load).abs().sum() / out_a.expert_load.sum()
    assert agree < 0.02, f"routing differs on {agree:.3%} of assignments"
    for name, x, y in zip(NAMES, a, b):
        assert rel_err(y, x) < 3e-2, (name, rel_err(y, x))

"""The reference model against independent float64 formulas and second code paths (issue A)."""
import dataclasses
import math

import torch

from vpmoe.config import ModelConfig, load_model_config
from vpmoe.model.model import (Attention, MoE, VpMoE, alibi_slopes, apply_rotary, attention_reference,
                               positions_from_docs, tpa_product)

TINY = load_model_config("configs/tiny.toml")


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, window=5,
                n_experts=8, expert_ffn=8, shared_ffn=16, dense_ffn=16, top_k=2, n_groups=4, topk_groups=2,
                max_seq_len=64)
    base.update(kw)
    return dataclasses.replace(TINY, **base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh random values everywhere (biases, sinks, mixes too), so no term hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_freq"):
                continue
            if name.endswith("value_mix"):
                p.copy_(torch.rand((), generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


def fast_body_step(model, tokens, doc, **body_kw):
    """One fp32, eager FastBody forward + backward with fixed output weights: (body, (hidden, aux
    loss, expert load, {parameter name: gradient})). For comparing FastBody variants."""
    from vpmoe.model.fast import FastBody

    body = FastBody(model, compile=False, dtype=torch.float32, **body_kw)
    model.zero_grad(set_to_none=True)
    hidden, aux, load = body(tokens, doc)
    w = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
    ((hidden * w).sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return body, (hidden.detach(), aux.detach(), load, grads)


def assert_same_fast_body_step(got, want) -> None:
    """Two `fast_body_step` results agree: hidden, aux loss, expert load and every gradient."""
    (h1, a1, l1, g1), (h0, a0, l0, g0) = got, want
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-7)
    assert torch.equal(l1, l0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------- attention semantics

def test_window_includes_current_token_and_no_cross_document_attention():
    """Through the real model: d output_i / d embedding_j != 0 iff same doc and i-127 <= j <= i."""
    cfg = small(window=128, n_layers=1, n_dense_layers=1, d_model=16, n_heads=2, n_kv_heads=1)
    model = randomize(VpMoE(cfg).double())
    T = 300
    doc = torch.zeros(1, T, dtype=torch.long)
    doc[0, 200:] = 1  # second document starts at 200
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    emb = model.embed(ids).detach().requires_grad_(True)
    model.embed.forward = lambda _ids: emb  # feed our leaf tensor
    out = model(ids, doc_ids=doc).hidden
    for i in (0, 126, 127, 128, 199, 200, 260, 299):
        (g,) = torch.autograd.grad(out[0, i].sum(), emb, retain_graph=True)
        seen = (g[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
        start = 200 if i >= 200 else 0
        assert seen == list(range(max(start, i - 127), i + 1)), f"query {i}"


def test_attention_reference_matches_float64_loop_with_sinks_window_alibi():
    torch.manual_seed(1)
    B, H, G, T, D, W = 2, 4, 2, 11, 8, 4
    q, k, v = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, G, T, D, dtype=torch.float64), \
        torch.randn(B, G, T, D, dtype=torch.float64)
    sinks = torch.randn(H, dtype=torch.float64)
    doc = torch.tensor([[0] * 6 + [1] * 5, [3] * 11])
    pos = positions_from_docs(doc)
    for window, slopes in ((W, None), (None, alibi_slopes(H).double())):
        got = attention_reference(q, k, v, sinks, pos, pos, doc, doc, window, slopes)
        want = torch.zeros_like(got)
        for b in range(B):
            for h in range(H):
                for i in range(T):
                    js = [j for j in range(T) if doc[b, j] == doc[b, i] and j <= i and (window is None or i - j < window)]
                    s = torch.stack([q[b, h, i] @ k[b, h // (H // G), j] / math.sqrt(D)
                                     - (0 if slopes is None else slopes[h] * (pos[b, i] - pos[b, j])) for j in js])
                    e = torch.exp(s)
                    p = e / (torch.exp(sinks[h]) + e.sum())  # sink: an extra column with no value
                    want[b, h, i] = sum(p[n] * v[b, h // (H // G), j] for n, j in enumerate(js))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_positions_restart_per_document_and_packed_equals_separate():
    cfg = small()
    model = randomize(VpMoE(cfg)).double().eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 9 + [1] * 7])
    assert positions_from_docs(doc).tolist() == [list(range(9)) + list(range(7))]
    with torch.no_grad():
        out = model(packed, doc_ids=doc).logits
        torch.testing.assert_close(out[:, :9], model(a).logits)
        torch.testing.assert_close(out[:, 9:], model(b).logits)


def test_grape_m_at_init_equals_plain_rope():
    cfg = small(head_dim=16)
    attn = Attention(cfg, layer=0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 100, 2047]])
    got = apply_rotary(x, pos, attn.grape_freq().double())
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))  # RoPE, half-split pairs
    z = torch.complex(x[..., :8], x[..., 8:]) * torch.polar(torch.ones(2, 1, 5, 8, dtype=torch.float64),
                                                          pos[:, None, :, None].double() * inv)
    want = torch.cat([z.real, z.imag], -1)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)  # log_freq is an fp32 parameter
    assert attn.log_freq.dtype == torch.float32


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # non-power of two follows the ALiBi paper's interleaving: 4 heads' slopes, then odd ones of 8
    want6 = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(want6))


def test_tpa_matches_written_formula():
    cfg = small()
    attn = randomize(Attention(cfg, layer=0)).double()
    x = torch.randn(2, 3, cfg.d_model, dtype=torch.float64)
    q, k, v = attn.project_qkv(x)
    H, G, D, Rq, Rk = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tpa_q_rank, cfg.tpa_kv_rank
    Aq, Bq = x @ attn.a_q.weight.T, x @ attn.b_q.weight.T
    want_q = torch.zeros(2, 3, H, D, dtype=torch.float64)
    for h in range(H):
        for r in range(Rq):
            want_q[:, :, h] += Aq[..., h * Rq + r, None] * Bq[..., r * D:(r + 1) * D] / Rq
    want_q += attn.q_bias.view(H, D)
    torch.testing.assert_close(q, want_q)
    Ak, Bk = x @ attn.a_k.weight.T, x @ attn.b_k.weight.T
    want_k = torch.stack([sum(Ak[..., g * Rk + r, None] * Bk[..., r * D:(r + 1) * D] for r in range(Rk)) / Rk
                          for g in range(G)], dim=2) + attn.k_bias.view(G, D)
    torch.testing.assert_close(k, want_k)
    assert tpa_product(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 3, 2)).tolist() == [[[[1.0, 1.0]]]]


def test_value_residual_mix():
    cfg = small()
    attn = randomize(Attention(cfg, layer=2)).double()  # a local layer > 0
    with torch.no_grad():
        attn.value_mix.fill_(0.3)
    x = torch.randn(1, 6, cfg.d_model, dtype=torch.float64)
    v_first = torch.randn(1, cfg.n_kv_heads, 6, cfg.head_dim, dtype=torch.float64)
    doc = torch.zeros(1, 6, dtype=torch.long)
    pos = positions_from_docs(doc)
    out, v_raw = attn(x, pos, doc, v_first)
    q, k, v = attn.project_qkv(x)
    q, k = attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2)
    v_mixed = 0.3 * v.transpose(1, 2) + 0.7 * v_first
    f = attn.grape_freq().double()
    y = attention_reference(apply_rotary(q, pos, f), apply_rotary(k, pos, f), v_mixed, attn.sinks, pos, pos, doc, doc,
                            cfg.window, None)
    torch.testing.assert_close(out, attn.wo(y.transpose(1, 2).reshape(1, 6, -1)))
    torch.testing.assert_close(v_raw, v.transpose(1, 2))
    assert Attention(cfg, layer=0).value_mix is None  # layer 0 has no mix parameter
    assert Attention(cfg, layer=1).value_mix.item() == 1.0  # starts as the identity


def test_layer_schedule():
    cfg = ModelConfig()
    glob = [i for i in range(80) if cfg.is_global(i)]
    assert glob == list(range(3, 80, 4)) and len(glob) == 20
    model_cfg = small(n_layers=8)
    m = VpMoE(model_cfg)
    assert [b.attn.is_global for b in m.layers] == [False, False, False, True] * 2
    assert not isinstance(m.layers[0].ffn, MoE) and all(isinstance(b.ffn, MoE) for b in m.layers[1:])


def test_initialisation_rules_and_meta_build():
    """The init rules (Normal(0, init_std) weights, output projections / sqrt(2 * layers), zero
    biases and sinks, ones for norms and value mixes, RoPE log-frequencies, zero router biases);
    a model built on "meta" and materialised draws exactly the weights of one built directly; a
    deeper model with the same seed shares every common parameter (per-name streams)."""
    cfg = small(n_layers=4, d_model=64, n_experts=16, expert_ffn=32)
    torch.manual_seed(3)
    model = VpMoE(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "log_freq":
            expected = (torch.log(1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64)
                                                            / cfg.head_dim)) * cfg.grape_log_scale).float()
            assert torch.equal(p, expected), name
        elif leaf == "value_mix" or ("norm" in name and leaf == "weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif leaf == "sinks" or leaf.startswith("b_") or leaf.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            std = out_std if (".wo." in name or ".down." in name or leaf == "w_down") else cfg.init_std
            assert p.numel() >= 256 and abs(p.mean().item()) < 4 * std / p.numel() ** 0.5, name
            assert abs(p.std().item() / std - 1) < 6 / (2 * p.numel()) ** 0.5 + 0.01, (name, p.std().item(), std)
    assert all(m.expert_bias.eq(0).all() for m in model.moe_layers())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    assert len({float(p.detach().flatten()[0]) for p in weights}) == len(weights)  # no two share a stream

    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = VpMoE(cfg)
    assert lazy.init_seed == model.init_seed and lazy.embed.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    a, b = model.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    deeper = VpMoE(dataclasses.replace(cfg, n_layers=6), init_seed=model.init_seed).state_dict()
    for k, v in a.items():  # output projections scale with depth; everything else is the same draw
        scale = math.sqrt(6 / 4) if (".wo." in k or ".down." in k or k.endswith("w_down")) else 1.0
        torch.testing.assert_close(deeper[k] * scale, v, rtol=1e-6, atol=0, msg=k)

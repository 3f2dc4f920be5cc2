"""The embedding's gradient as rows (`graphed.EMBED_ROWS`: `FastBody.embed_rows`,
`fast.embedding_rows`, `FastMuonAdamW.step(row_grads=...)`) against the dense [V, d] gradient of
the lookup's ordinary backward: the same gradient (float64 and the dense path), the same AdamW
update and state, the same clipping norm. CPU; the graphed step on the GPU:
tests/gpu/test_gpu_graphed.py."""
import copy

import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.model.fast import FastBody, embedding_rows
from vpmoe.model.model import VpMoE
from vpmoe.train.optim import OptimConfig, build_optimizer
from vpmoe.train.optim_fast import FastMuonAdamW


def dense(rowmap: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The [V, d] gradient the rows stand for."""
    out = torch.zeros(rowmap.numel(), rows.shape[1], dtype=rows.dtype)
    hit = rowmap >= 0
    out[hit] = rows[rowmap[hit]]
    return out


def test_embedding_rows_are_the_lookup_gradient():
    """Tokens repeated within and across rows, the table's last row used once: the rows densified
    equal the lookup backward's [V, d] gradient (float64 reference), one row per distinct token,
    the rest zero."""
    gen = torch.Generator().manual_seed(5)
    V, d = 97, 24
    tokens = torch.randint(0, 12, (3, 40), generator=gen)
    tokens[2, 7] = V - 1
    grad_out = torch.randn(3, 40, d, generator=gen)
    rowmap, rows = embedding_rows(tokens, grad_out, V)
    assert rowmap.shape == (V,) and rows.shape == (tokens.numel(), d) and rows.dtype == torch.float32
    distinct = tokens.unique()
    assert sorted(rowmap[rowmap >= 0].tolist()) == list(range(len(distinct)))  # one row each
    assert torch.equal(rowmap >= 0, torch.isin(torch.arange(V), distinct))
    assert not rows[len(distinct):].any()
    weight = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.embedding(tokens, weight).backward(grad_out.double())
    torch.testing.assert_close(dense(rowmap, rows).double(), weight.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpoint", [False, 2])
def test_fast_body_embed_rows_give_the_dense_gradient(checkpoint):
    """`embed_rows`: the weight's .grad stays None, the rows give the dense path's gradient, every
    other gradient is unchanged (also with the first blocks checkpointed: the leaf is the first
    block's saved input); a no-grad forward (an evaluation) between backward and step keeps the
    rows; a head tied to the embedding keeps the dense path (its gradient fills every row)."""
    cfg = small(n_layers=3, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    grads, rows = {}, None
    for on in (False, True):
        model = copy.deepcopy(m0)
        body = FastBody(model, compile=False, dtype=torch.float32, checkpoint=checkpoint)
        body.embed_rows = on
        hidden, aux, _ = body(tokens)
        (hidden.square().mean() + aux).backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        row_grads = body.embedding_row_grads()
        if on:
            assert "embed.weight" not in grads[on] and set(row_grads) == {id(model.embed.weight)}
            with torch.no_grad():
                body(tokens)
            rows = body.embedding_row_grads()[id(model.embed.weight)]
            torch.testing.assert_close(rows[1], row_grads[id(model.embed.weight)][1], rtol=0, atol=0)
        else:
            assert row_grads == {}
    torch.testing.assert_close(dense(*rows), grads[False].pop("embed.weight"), rtol=1e-6, atol=1e-7)
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])
    model = copy.deepcopy(m0)
    model.lm_head.weight = model.embed.weight
    body = FastBody(model, compile=False, dtype=torch.float32)
    body.embed_rows = True
    hidden, aux, _ = body(tokens)
    (hidden.square().mean() + aux).backward()
    assert body.embedding_row_grads() == {} and model.embed.weight.grad is not None


@pytest.mark.parametrize("max_norm", [1e9, 1e-2])
def test_adamw_from_rows_equals_adamw_from_the_dense_gradient(max_norm, monkeypatch):
    """Three steps of FastMuonAdamW with the embedding's gradient as rows and as the dense [V, d]
    tensor they stand for: the same clipping norm (to rounding: the rows' squares are summed in
    another order), and with clipping off (coefficient exactly 1) the same parameters and AdamW
    state to the bit; with clipping on, to the norm's rounding. The dense embedding takes the
    big-tensor update (`ADAMW_ALONE`, as the real one's 201,088 rows do), the rows' math."""
    import vpmoe.train.optim_fast as OF

    monkeypatch.setattr(OF, "ADAMW_ALONE", 1024)
    cfg = small(n_layers=2, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=8)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(m0)
        runs.append((model, FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=max_norm,
                                          compile=False)))
    gen = torch.Generator().manual_seed(9)
    V, d = cfg.vocab_size, cfg.d_model
    for step in range(3):
        tokens = torch.randint(0, 30, (2, 25), generator=gen)
        g_out = torch.randn(2, 25, d, generator=gen)
        others = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in m0.named_parameters() if n != "embed.weight"}
        rowmap, rows = embedding_rows(tokens, g_out, V)
        norms = []
        for as_rows, (model, opt) in zip((False, True), runs):
            for n, p in model.named_parameters():
                p.grad = others[n].clone() if n != "embed.weight" else None
            emb = model.embed.weight
            if as_rows:
                norms.append(opt.step(row_grads={id(emb): (rowmap, rows)}))
            else:
                emb.grad = torch.zeros(V, d).index_add_(0, tokens.reshape(-1), g_out.reshape(-1, d))
                norms.append(opt.step())
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
    (ma, oa), (mb, ob) = runs
    exact = max_norm > 1e6
    for (n, a), b in zip(ma.named_parameters(), mb.parameters()):
        if exact:
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    sa, sb = oa.opt.state[ma.embed.weight], ob.opt.state[mb.embed.weight]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-9)


def test_row_gradients_refused_where_they_cannot_apply():
    model = VpMoE(small(n_layers=2, d_model=32, expert_ffn=16, n_experts=8))
    opt = FastMuonAdamW(build_optimizer(model, OptimConfig()), compile=False)
    rowmap, rows = embedding_rows(torch.tensor([[1, 2, 1]]), torch.randn(1, 3, 32), model.cfg.vocab_size)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="both a .grad and row gradients"):
        opt.step(row_grads={id(model.embed.weight): (rowmap, rows)})
    muon = next(p for g in opt.opt.param_groups if g["kind"] == "muon" for p in g["params"])
    with pytest.raises(ValueError, match="AdamW parameters only"):
        opt.step(row_grads={id(muon): (rowmap, rows)})


def test_adamw_rows_update_traces_whole_and_matches_eager():
    """The compiled piece (`_adamw_rows_update`) as one graph (no break: on the GPU the gather is
    then part of the update's one pass), equal to its eager self."""
    from vpmoe.train.optim_fast import _adamw_rows_update

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(13)
    V, d = 50, 16
    rowmap, rows = embedding_rows(torch.randint(0, 20, (2, 9), generator=gen), torch.randn(2, 9, d, generator=gen), V)
    w0, m0, v0 = torch.randn(V, d, generator=gen), torch.randn(V, d, generator=gen), torch.rand(V, d, generator=gen)
    outs = []
    for fn in (_adamw_rows_update, torch.compile(_adamw_rows_update, fullgraph=True, backend="aot_eager", dynamic=False)):
        w, m, v = w0.clone(), m0.clone(), v0.clone()
        fn(w, rowmap, rows, m, v, torch.tensor(2.0), torch.tensor(1e-3), torch.tensor(0.6), 0.9, 0.95, 0.1, 1e-8)
        outs.append((w, m, v))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert not torch.equal(outs[0][0], w0)

"""The shared expert beside the routed path (`FastBody(overlap_shared=True)`): an MoE block that keeps
its activations runs as its four pieces (`make_block_fn`: attention + norm, router + routed
experts, shared expert, their sum); on a GPU the shared expert goes to a side stream. On the CPU
the pieces run in order, so this checks the split itself: the same function and gradients as the
whole block (bit for bit eagerly: the same ops in the same order), as the float64 reference model,
and with compiled pieces (AOTAutograd) and the expert-gradient options the trainer turns on.
The side stream itself: tests/gpu/test_gpu_fast_paths.py."""
import copy

import pytest
import torch

from tests.test_model import (
    fast_body_step,
    randomize,
    small,
)
from vpmoe.model import fast as F
from vpmoe.model.model import VpMoE


def _count_overlapped(monkeypatch) -> list[int]:
    calls = [0]
    real = F.FastBody._overlapped_block

    def counted(self, pieces, args):
        calls[0] += 1
        return real(self, pieces, args)
    monkeypatch.setattr(F.FastBody, "_overlapped_block", counted)
    return calls


@pytest.mark.parametrize("checkpoint", [False, 2])
def test_pieces_equal_the_whole_block_bit_for_bit(checkpoint, monkeypatch):
    """fp32, eager: hidden state, aux loss, loads and every gradient equal to the whole-block body's;
    the pieces serve exactly the MoE blocks that are not checkpointed (dense layer 0 and the first
    `checkpoint` blocks run whole)."""
    cfg = small(n_layers=5)
    m0 = randomize(VpMoE(cfg), seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 11 + [1] * 8, [0] * 4 + [1] * 15])
    calls = _count_overlapped(monkeypatch)
    _, whole = fast_body_step(copy.deepcopy(m0), tokens, doc, checkpoint=checkpoint, overlap_shared=False)
    assert calls[0] == 0
    body, split = fast_body_step(copy.deepcopy(m0), tokens, doc, checkpoint=checkpoint, overlap_shared=True)
    moe_kept = [i for i in range(cfg.n_layers) if cfg.is_moe(i) and i >= (checkpoint or 0)]
    assert calls[0] == len(moe_kept) > 0
    assert {k[:2] for k in body.pieces} == {(cfg.is_global(i), True) for i in moe_kept}
    (h1, a1, l1, g1), (h0, a0, l0, g0) = split, whole
    assert torch.equal(h1, h0) and torch.equal(a1, a0) and torch.equal(l1, l0)
    assert g1.keys() == g0.keys() and all(torch.equal(g1[n], g0[n]) for n in g0), \
        [n for n in g0 if not torch.equal(g1[n], g0[n])]


def test_pieces_match_the_float64_reference():
    """float64: the split body computes `VpMoE.forward(return_hidden=True)` and its gradients."""
    cfg = small(n_layers=4)
    ref = randomize(VpMoE(cfg).double(), seed=5)
    model = copy.deepcopy(ref)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    body = F.FastBody(model, compile=False, overlap_shared=True)
    assert body.dtype == torch.float64 and body.pieces
    out = ref(tokens, doc_ids=doc, return_hidden=True)
    hidden, aux, load = body(tokens, doc)
    torch.testing.assert_close(hidden, out.hidden, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-10, atol=1e-12)
    assert torch.equal(load, out.expert_load)
    g = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ((out.hidden * g).sum() + out.aux_loss).backward()
    ((hidden * g).sum() + aux).backward()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if name == "lm_head.weight":
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("options", [False, True])
def test_compiled_pieces_match_the_compiled_whole_block(options):
    """Compiled through AOTAutograd (the GPU's compile path without Inductor), bf16 GEMMs: the pieces
    give the whole-block body's hidden state and gradients; with `options` the trainer's expert
    options too (kept bf16 weight copies, bf16 gradient holders, the norm's squares probes), which
    the routed piece takes through the block's parameter dict. No graph breaks in either body."""
    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    results = []
    for overlap in (False, True):
        model = copy.deepcopy(m0)
        body = F.FastBody(model, compile=True, compile_backend="aot_eager", dtype=torch.bfloat16,
                          overlap_shared=overlap)
        if options:
            body.use_weight_copies(True)
            body.use_low_grads(True)
            body.grad_sq = True
        hidden, aux, _ = body(tokens)
        w_out = torch.linspace(-1, 1, hidden.numel()).view(hidden.shape)
        ((hidden.float() * w_out).sum() + aux).backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        grads.update({f"low.{i}.{w}": h.grad.float() for i, layer in body.holders.items()
                      for w, (_, h) in layer.items()})
        assert set(body.compile_modes().values()) == {"fullgraph"}
        assert all(f.mode == "fullgraph" for pieces in body.pieces.values() for f in pieces)
        assert bool(body.pieces) == overlap
        results.append((hidden.float(), grads))
    (h0, g0), (h1, g1) = results
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)
    assert g1.keys() == g0.keys()
    if options:
        assert any(k.startswith("low.") for k in g0)  # (the probes get gradients from the GPU kernel only)
    for n in g0:
        # one difference in rounding: the normed input's two bf16 gradients (routed and shared
        # experts) are summed in bf16 by autograd between pieces, inside the compiled graph otherwise
        torch.testing.assert_close(g1[n], g0[n], rtol=2e-2, atol=2e-2 * g0[n].abs().max().item(), msg=n)

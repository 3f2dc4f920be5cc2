"""The kept bf16 expert and head weights (`FastBody.use_weight_copies`, written by `FastMuonAdamW`
with each update, `graphed.WEIGHT_COPIES`; the head's read by the loss as `head_low`) against the
default path that casts the fp32 masters in every forward: the same bits everywhere, expert copies
only where a block keeps its activations, and a master changed outside the optimizer cast again
before the next forward. CPU, bf16 bodies (the copies' dtype); the GPU's graphed step:
tests/gpu/test_gpu_graphed.py."""
import copy

import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.kd.fused import fused_span_loss
from vpmoe.kd.losses import LossSpec
from vpmoe.model.fast import FastBody
from vpmoe.model.model import VpMoE
from vpmoe.train import optim_fast
from vpmoe.train.optim import OptimConfig, build_optimizer
from vpmoe.train.optim_fast import FastMuonAdamW


def _setup(checkpoint=False, compiled=False, monkeypatch=None):
    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, expert_ffn=16, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=6)
    if monkeypatch is not None:  # the head's AdamW on its own in both runs, as at vpMoE's size (a kept
        # copy sends it there: the multi-tensor kernel rounds differently)
        monkeypatch.setattr(optim_fast, "ADAMW_ALONE", m0.lm_head.weight.numel())
    runs = []
    for keep in (False, True):
        model = copy.deepcopy(m0)
        body = FastBody(model, compile=compiled, compile_backend="aot_eager", checkpoint=checkpoint,
                        dtype=torch.bfloat16)
        opt = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.5, compile=False)
        opt.weight_copies = body.use_weight_copies(keep)
        runs.append((model, body, opt))
    return cfg, runs


def _step(model, body, opt, tokens, doc):
    """One step: the body, then the head and CE loss through the fused loss (taking the body's kept
    head copy where it has one), the update."""
    model.zero_grad(set_to_none=True)
    hidden, aux, _ = body(tokens, doc)
    labels = torch.roll(tokens, -1, 1).flatten()
    span = torch.ones_like(labels)
    span[::7] = 2
    loss, _ = fused_span_loss(hidden.flatten(0, 1), model.lm_head.weight, labels, span, LossSpec(kind="ce"),
                              head_low=body.head_low())
    (loss + hidden.float().square().mean() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    body.mark_copies_current()
    return torch.cat([hidden.detach().flatten().float(), loss.detach().float()[None]]), grads


def assert_copies_exact(body):
    """Every kept copy (the experts' and the head's) is its master's bf16 cast, at the master's
    current version."""
    entries = [entry for layer in body.copies.values() for entry in layer.values()]
    entries += [] if body.head_copy is None else [body.head_copy]
    for master, low, version in entries:
        assert low.dtype == torch.bfloat16 and torch.equal(low, master.detach().to(torch.bfloat16))
        assert version == master._version


@pytest.mark.parametrize("checkpoint,compiled,above_row_limit", [(False, False, False), (2, False, False),
                                                                  (False, True, False), (False, False, True),
                                                                  (False, True, True)])
def test_kept_bf16_weights_give_the_cast_path_bit_for_bit(checkpoint, compiled, above_row_limit, monkeypatch):
    """Three steps with and without copies: forward, every gradient and every weight bit-equal. With
    `above_row_limit` the micro-batch's expert rows are above the gathered weight-gradient kernel's
    limit (`kernels.gathered_wgrad_serves`: grouped-GEMM weight gradients; without copies the
    weights are cast before the Functions, with copies the Functions take them as they are)."""
    from vpmoe.model import kernels as K

    if above_row_limit:
        monkeypatch.setattr(K, "GATHERED_WGRAD_MAX_ROWS", 0)
    cfg, (plain, kept) = _setup(checkpoint, compiled, monkeypatch)
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe(i)]
    first_kept = checkpoint or 0
    assert plain[1].copies == {} and plain[1].head_low() is None
    assert sorted(kept[1].copies) == [i for i in moe if i >= first_kept] and kept[1].copies
    assert kept[1].head_copy[0] is kept[0].lm_head.weight  # the head's copy, checkpointing or not
    assert len(kept[2].weight_copies) == 2 * len(kept[1].copies) + 1
    gen = torch.Generator().manual_seed(3)
    doc = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
    for step in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=gen)
        (h0, g0), (h1, g1) = _step(*plain, tokens, doc), _step(*kept, tokens, doc)
        assert torch.equal(h0, h1), step
        assert g0.keys() == g1.keys()
        for n in g0:
            assert torch.equal(g0[n], g1[n]), (step, n)
        for (n, a), b in zip(plain[0].named_parameters(), kept[0].parameters()):
            assert torch.equal(a, b), (step, n)
        assert_copies_exact(kept[1])  # the update wrote them
        assert kept[1].refresh_stale_copies() == 0
    if compiled:
        assert set(kept[1].compile_modes().values()) == {"fullgraph"}, kept[1].compile_modes()


@pytest.mark.parametrize("above_row_limit", [False, True])
def test_a_master_changed_outside_the_optimizer_is_cast_again(above_row_limit, monkeypatch):
    from vpmoe.model import kernels as K

    if above_row_limit:  # the grouped-GEMM weight gradients' micro-batches read the copies too
        monkeypatch.setattr(K, "GATHERED_WGRAD_MAX_ROWS", 0)
    cfg, (plain, kept) = _setup()
    layer = next(iter(kept[1].copies))
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the forward reads the copy, not the master: a copy changed behind its back shows
        kept[1].copies[layer]["w_up"][1].mul_(2)
        assert not torch.equal(plain[1](tokens)[0], kept[1](tokens)[0])
        kept[1].copies[layer]["w_up"][1].div_(2)
        assert torch.equal(plain[1](tokens)[0], kept[1](tokens)[0])
    with torch.no_grad():  # e.g. a checkpoint load into the live model (the head's copy too)
        for model in (plain[0], kept[0]):
            model.layers[layer].ffn.w_up.add_(0.25)
            model.lm_head.weight.mul_(1.5)
    assert kept[1].refresh_stale_copies() == 2
    assert_copies_exact(kept[1])
    with torch.no_grad():
        assert torch.equal(plain[1](tokens)[0], kept[1](tokens)[0])
    # a forward refreshes on its own too
    with torch.no_grad():
        for model in (plain[0], kept[0]):
            model.layers[layer].ffn.w_down.mul_(0.5)
        assert torch.equal(plain[1](tokens)[0], kept[1](tokens)[0])
    assert_copies_exact(kept[1])


def test_no_copies_where_they_do_not_apply():
    cfg = small(n_layers=4, d_model=32, expert_ffn=16, n_experts=8)
    model = VpMoE(cfg)
    assert FastBody(model, compile=False, dtype=torch.float32).use_weight_copies(True) == {}  # fp32 body
    head = model.lm_head.weight
    # every block checkpointed: no expert copies (their casts are transient), the head's only
    only_head = FastBody(model, compile=False, dtype=torch.bfloat16, checkpoint=True).use_weight_copies(True)
    assert list(only_head) == [id(head)] and torch.equal(only_head[id(head)], head.detach().bfloat16())
    body = FastBody(model, compile=False, dtype=torch.bfloat16)
    assert len(body.use_weight_copies(True)) == 2 * len(body.copies) + 1 > 1
    assert body.use_weight_copies(False) == {} and body.copies == {} and body.head_low() is None


def test_auto_keeps_copies_only_where_memory_is_plainly_spare():
    """graphed.WEIGHT_COPIES = "auto" (`copies_wanted`): copies when nothing is checkpointed and they
    are at most COPIES_AUTO_SHARE of the device's memory; True / False pass through."""
    from vpmoe.model import graphed as G

    cfg = small(n_layers=4, d_model=32, expert_ffn=16, n_experts=8)
    model = VpMoE(cfg)
    body = FastBody(model, compile=False, dtype=torch.bfloat16)
    need = 2 * model.lm_head.weight.numel() + sum(2 * (m.w_up.numel() + m.w_down.numel()) for m in model.moe_layers())
    assert need > 0
    limit = need / G.COPIES_AUTO_SHARE  # the least device memory that takes them
    assert G.copies_wanted(body, "auto", total_memory=int(limit) + 1)
    assert not G.copies_wanted(body, "auto", total_memory=int(limit) - 1)
    assert not G.copies_wanted(body, "auto")  # a CPU body: no device memory to spare
    checkpointed = FastBody(model, compile=False, dtype=torch.bfloat16, checkpoint=1)
    assert not G.copies_wanted(checkpointed, "auto", total_memory=10 * int(limit))
    assert G.copies_wanted(checkpointed, True) and not G.copies_wanted(body, False, total_memory=10 * int(limit))
    with pytest.raises(ValueError, match="WEIGHT_COPIES"):
        G.copies_wanted(body, "on")

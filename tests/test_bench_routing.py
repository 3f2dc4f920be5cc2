"""bench/train_step.py's `balance_routing` (the `--routing balanced` setting of the benchmark):
starting from a router that sends nearly every token to one expert, its sign updates of the
router biases bring the loads near even, and it leaves the model as it found it (implementations,
train mode)."""
import torch

from bench.train_step import balance_routing, load_imbalance
from tests.test_model import small
from vpmoe.model.model import VpMoE


def test_balance_routing_evens_a_skewed_router():
    torch.manual_seed(0)
    cfg = small(n_layers=3, max_seq_len=256)
    model = VpMoE(cfg)
    for moe in model.moe_layers():
        moe.expert_bias[0] = 0.1  # expert 0 wins nearly every token: max / mean load near E / k = 4
    tokens = torch.randint(0, cfg.vocab_size, (3, 256), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": tokens, "doc_ids": torch.zeros_like(tokens)}
    impls = [(b.attn.impl, getattr(b.ffn, "dispatcher", None)) for b in model.layers]
    before, after = balance_routing(model, batch, iters=40)
    assert before > 3.5, before
    assert after < 1.6, after
    with torch.no_grad():  # the balance holds on rows it was not fitted on
        held_out = model(tokens[2:], return_hidden=True).expert_load
    assert load_imbalance(held_out) < 1.8
    assert model.training
    assert [(b.attn.impl, getattr(b.ffn, "dispatcher", None)) for b in model.layers] == impls

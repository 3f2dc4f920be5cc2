"""Fast paths against the reference on the CPU (the GPU versions: tests/gpu/)."""
import torch

from vpmoe.model.kernels import experts_grouped, permute_by_expert
from vpmoe.model.model import MoE, VpMoE, experts_loop, route_reference
from tests.test_model import randomize, small


def test_permutation_groups_rows_by_expert():
    idx = torch.tensor([[3, 0], [1, 3], [0, 2], [3, 1]])
    order, expert_of_row, offsets = permute_by_expert(idx, 4)
    assert expert_of_row.tolist() == sorted(idx.flatten().tolist())
    assert idx.flatten()[order].tolist() == expert_of_row.tolist()
    assert offsets.tolist() == [2, 4, 5, 8]


def test_grouped_experts_match_loop_forward_and_backward():
    cfg = small(n_experts=16, n_groups=4, topk_groups=2, top_k=4, expert_ffn=16)
    moe = randomize(MoE(cfg))
    x = torch.randn(37, cfg.d_model, requires_grad=True)
    idx, w, _ = route_reference(x, moe.router.weight, moe.expert_bias, cfg)
    idx, w = idx.clone(), w.detach()
    idx[0] = torch.tensor([0, 1, 2, 3])  # an expert with rows everywhere, and some experts with none
    results = []
    for fn in (experts_loop, experts_grouped):
        moe.zero_grad()
        x.grad = None
        y = fn(moe, x, idx, w)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        (y * g).sum().backward()
        results.append((y.detach(), x.grad.clone(), moe.w_up.grad.clone(), moe.b_down.grad.clone()))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_with_fast_paths_matches_reference_on_cpu():
    from vpmoe.model.kernels import use_fast_paths
    cfg = small()
    ref = randomize(VpMoE(cfg))
    fast = randomize(VpMoE(cfg))
    use_fast_paths(fast)  # attention falls back to the reference on CPU with grad; MoE is grouped
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 20])
    torch.testing.assert_close(fast(ids, doc_ids=doc).logits, ref(ids, doc_ids=doc).logits, rtol=1e-5, atol=1e-5)

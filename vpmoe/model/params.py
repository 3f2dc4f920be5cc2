"""Parameter counts of a config without allocating weights.

The model is built on the `meta` device (shapes only, no memory), so the count is exactly what
`VpMoE(cfg)` would hold, and cannot drift from the model code. Active parameters per token count
everything except the routed experts a token does not use: each MoE layer contributes
`top_k / n_experts` of its routed-expert parameters. Both embedding tables (input embedding and
output head, untied) count as active, as in the reference budget; `active_non_embedding` drops them.
"""
from __future__ import annotations

import torch

from vpmoe.config import ModelConfig

ROUTED_EXPERT_PARAMS = ("w_up", "b_up", "w_down", "b_down")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    from vpmoe.model.model import VpMoE

    with torch.device("meta"):
        model = VpMoE(cfg)
    total = routed = embedding = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.rsplit(".", 1)[-1] in ROUTED_EXPERT_PARAMS:
            routed += n
        if name in ("embed.weight", "lm_head.weight"):
            embedding += n
    inactive = routed - routed * cfg.top_k // cfg.n_experts
    active = total - inactive
    return {"total": total, "active": active, "active_non_embedding": active - embedding,
            "embedding": embedding, "routed_experts": routed}

"""Router health on held-out text: per-layer expert load, dead experts, load entropy.

Design choices:
- vpMoE: the inner `VpMoE` forward returns `expert_load` [n_moe_layers, n_experts] (top-k slots
  per expert, docs/interfaces.md); documents are run one at a time, unpadded, so padding is never
  routed and counted. An HF MoE that returns `router_logits` (e.g. Qwen3-MoE, output_router_logits)
  is counted the same way from its top-k; any other model reports "not applicable".
- Metrics per layer: load share per expert, dead experts (no token routed; listed by index),
  normalised load entropy H(p) / ln(E) (1 = perfectly even, 0 = one expert takes everything),
  max/mean load ratio and the coefficient of variation. The summary averages entropy over layers and
  counts dead experts over all layers.
- Held-out text: the valid split of `--data` when given, else the built-in Harmony prompts and
  numeric strings, so the suite always runs; `source` says which.
"""
from __future__ import annotations

import math

import torch

from vpmoe.eval.harness import forward_kwargs, model_device
from vpmoe.eval.loading import SubsetCausalLM, inner_vpmoe


@torch.no_grad()
def vpmoe_load(inner, documents: list[list[int]]) -> torch.Tensor:
    device = model_device(inner)
    total = None
    for doc in documents:
        out = inner(torch.tensor([doc], dtype=torch.long, device=device), return_hidden=True)
        load = out.expert_load.detach().to("cpu", torch.long)
        total = load if total is None else total + load
    return total


@torch.no_grad()
def hf_router_load(model, documents: list[list[int]]) -> torch.Tensor | None:
    """Top-k counts from `router_logits` of an HF MoE; None when the model has no routers."""
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    params = forward_kwargs(model)
    if not top_k or ("output_router_logits" not in params and "kwargs" not in params):
        return None
    device = model_device(model)
    total = None
    for doc in documents:
        out = model(input_ids=torch.tensor([doc], dtype=torch.long, device=device),
                    output_router_logits=True, use_cache=False)
        router_logits = getattr(out, "router_logits", None)
        if not router_logits:
            return None
        loads = []
        for layer_logits in router_logits:
            if layer_logits is None:
                continue
            layer_logits = layer_logits[0] if isinstance(layer_logits, tuple) else layer_logits
            chosen = layer_logits.float().reshape(-1, layer_logits.shape[-1]).topk(top_k, dim=-1).indices
            loads.append(torch.bincount(chosen.reshape(-1).cpu(), minlength=layer_logits.shape[-1]))
        load = torch.stack(loads)
        total = load if total is None else total + load
    return total


def layer_stats(load: torch.Tensor) -> dict:
    counts = load.double()
    total = float(counts.sum())
    n = counts.numel()
    share = counts / total if total > 0 else torch.zeros_like(counts)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(n) if n > 1 and total > 0 else None
    mean = total / n
    return {"tokens_routed": int(total), "load": [int(v) for v in load.tolist()],
            "dead_experts": [i for i, v in enumerate(load.tolist()) if v == 0],
            "entropy_norm": entropy,
            "max_over_mean": float(counts.max()) / mean if mean > 0 else None,
            "cv": float(counts.std(unbiased=False)) / mean if mean > 0 else None}


def summarize_load(load: torch.Tensor) -> dict:
    """Metrics of a [n_moe_layers, n_experts] load matrix (see the module docstring)."""
    layers = [layer_stats(row) for row in load]
    entropies = [l["entropy_norm"] for l in layers if l["entropy_norm"] is not None]
    n_dead = sum(len(l["dead_experts"]) for l in layers)
    return {"applicable": True, "n_moe_layers": int(load.shape[0]), "n_experts": int(load.shape[1]),
            "mean_entropy_norm": sum(entropies) / len(entropies) if entropies else None,
            "min_entropy_norm": min(entropies) if entropies else None,
            "dead_experts_total": n_dead,
            "dead_expert_share": n_dead / load.numel() if load.numel() else None,
            "max_over_mean_worst": max((l["max_over_mean"] or 0.0) for l in layers) if layers else None,
            "layers": layers}


def run_router(model, documents: list[list[int]], source: str = "builtin") -> dict:
    documents = [d for d in documents if d]
    skipped, subset = 0, None
    if isinstance(model, SubsetCausalLM):  # a vocab-subset model: its own ids, whole documents only
        subset = model.subset
        kept = [subset.to_compact(torch.tensor(d), missing=-1) for d in documents]
        skipped = sum(bool((k < 0).any()) for k in kept)
        documents = [k.tolist() for k in kept if not (k < 0).any()]
        model = model.inner
        if not documents:
            return {"applicable": False, "reason": f"every document has tokens outside the model's vocabulary "
                                                   f"subset ({len(subset)} ids)"}
    inner = inner_vpmoe(model)
    if inner is not None:
        load = vpmoe_load(inner, documents)
    else:
        load = hf_router_load(model, documents)
        if load is None:
            return {"applicable": False, "reason": f"{type(model).__name__} has no routers (no expert_load "
                                                   "or router_logits): not a mixture-of-experts model"}
    result = summarize_load(load)
    result.update({"source": source, "n_documents": len(documents), "n_tokens": sum(len(d) for d in documents)})
    if subset is not None:
        result["documents_skipped_outside_vocab_subset"] = skipped
    return result


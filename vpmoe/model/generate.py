"""Sampling from a VpMoE with its KV cache: batched, left-padded, greedy or temperature/top-p.

Design choices:
- One function, `generate`, used by the eval, the demo and (later) on-policy distillation rollouts:
  prompts of different lengths are left-padded into one batch and prefilled in one forward; then
  one token per step through the cache (local layers keep only their window).
- Ids in and out are full o200k ids; with a vocabulary subset (vpmoe.data.vocab_subset) the model
  sees compact ids and sampled ids are mapped back, so callers never handle compact ids.
- A row stops at its first stop token (kept in the output); finished rows keep running as padding
  until all rows stop or `max_new_tokens` is reached (simple, and the batch shape stays static).
- Sampling uses a `torch.Generator` seeded by the caller, so rollouts are reproducible.
- On a GPU the call runs the routed experts through grouped GEMMs (`kernels.experts_grouped`, the
  same function; `grouped_experts`, which the HF adapter's forward uses too) instead of the
  reference loop, whose `nonzero` syncs the host once per expert and layer: ~20k times per decoded
  token at 80 layers. The loop is put back after; other dispatchers (expert parallelism) are kept.
"""
from __future__ import annotations

import contextlib

import torch

from vpmoe.model import model as M
from vpmoe.model.model import VpMoE

# device types where sampling and the HF adapter run the routed experts as grouped GEMMs (module
# docstring); a module setting (bench/generate.py's A/B switch, tests), not a config knob
GROUPED_EXPERTS_ON = ("cuda",)

HARMONY_STOPS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>


@torch.no_grad()
def generate(model: VpMoE, prompts: list[list[int]], max_new_tokens: int, stop_ids=HARMONY_STOPS,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, subset=None,
             pad_id: int = 199999) -> list[list[int]]:
    """Continuations (without the prompt) for each prompt; greedy when temperature == 0."""
    device = next(model.parameters()).device
    B = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    if subset is not None:
        ids = subset.to_compact(ids)
    ids, mask = ids.to(device), mask.to(device)
    stops = torch.as_tensor(list(stop_ids), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with grouped_experts(model, device):
            out = _decode(model, ids, mask, max_new_tokens, stops, temperature, top_p, gen, subset)
    finally:
        model.train(was_training)
    return [[int(t) for t in row if t >= 0] for row in out.cpu()]


@contextlib.contextmanager
def grouped_experts(model: VpMoE, device: torch.device):
    """On `GROUPED_EXPERTS_ON` devices, MoE layers whose dispatcher is the reference loop run the
    grouped-GEMM one for the duration (module docstring)."""
    swapped = []
    if device.type in GROUPED_EXPERTS_ON:
        from vpmoe.model.kernels import experts_grouped
        swapped = [m for m in model.moe_layers() if m.dispatcher is M.experts_loop]
        for m in swapped:
            m.dispatcher = experts_grouped
    try:
        yield
    finally:
        for m in swapped:
            m.dispatcher = M.experts_loop


def _decode(model, ids, mask, max_new_tokens, stops, temperature, top_p, gen, subset) -> torch.Tensor:
    """Prefill, then one token per step; [B, new] with -1 after a row's stop."""
    B, device = ids.shape[0], ids.device
    cache = model.new_cache(B)
    # the head on the last position only: the prompt's other logits would be [B, T, V] for nothing
    logits = model.lm_head(model(ids, cache=cache, attention_mask=mask, return_hidden=True).hidden[:, -1])
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample(logits.float(), temperature, top_p, gen)
        full = subset.to_full(nxt) if subset is not None else nxt
        out = torch.cat([out, torch.where(done, torch.full_like(full, -1), full)[:, None]], 1)
        done |= torch.isin(full, stops)
        if step == max_new_tokens - 1 or bool(done.all()):  # the last token's logits are never read
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # the max subtracted first: the same distribution, and no inf - inf at a tiny temperature
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted probs whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True  # the most likely token always (top_p = 0: greedy)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

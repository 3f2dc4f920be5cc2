"""Sampling from a VpMoE with its KV cache: batched, left-padded, greedy or temperature/top-p.

Design choices:
- One function, `generate`, used by the eval, the demo and (later) on-policy distillation rollouts:
  prompts of different lengths are left-padded into one batch and prefilled through the cache, in
  chunks of `PREFILL_TOKENS` over all rows (one forward for short prompts); then one token per step
  through the cache (local layers keep only their window).
- Ids in and out are full o200k ids; with a vocabulary subset (vpmoe.data.vocab_subset) the model
  sees compact ids and sampled ids are mapped back, so callers never handle compact ids.
- A row stops at its first stop token (kept in the output); finished rows keep running as padding
  until all rows stop or `max_new_tokens` is reached (simple, and the batch shape stays static).
- Sampling uses a `torch.Generator` seeded by the caller, so rollouts are reproducible.
- On a GPU the call runs the routed experts through grouped GEMMs (`kernels.experts_grouped`, the
  same function; `grouped_experts`, which the HF adapter's forward uses too) instead of the
  reference loop, whose `nonzero` syncs the host once per expert and layer: ~20k times per decoded
  token at 80 layers. The loop is put back after; other dispatchers (expert parallelism) are kept.
- Even so an eager decode step is launch-bound: ~80 ms per step at 20 layers on an H100 whether it
  decodes 1 row or 64 (12.8 against 827 tokens/s, bench/RESULTS.md 2026-12-05 14:34). So on a GPU
  the cache has fixed shapes (`StaticKVCache`: capacity = the longest prompt + max_new_tokens) and
  the decode step is captured once as a CUDA graph and replayed (`CapturedDecode`); a step that
  cannot be captured falls back to eager launches with a warning (H100, 2026-12-05: 6.6x the
  eager step at 1 row, 5.6x at 64 rows, 20 layers; 24 tokens/s at 1 row and 80 layers). Sampling
  itself stays outside the graph (a few kernels). On a GPU the rows' stops are read every 8 steps
  (`STOP_CHECK_EVERY`), not every step, so the host does not wait for each step before queuing the
  next; the tokens are the same (a finished row only adds -1s, which are dropped).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from vpmoe.model import model as M
from vpmoe.model.cache import StaticKVCache
from vpmoe.model.model import VpMoE

# device types where sampling and the HF adapter run the routed experts as grouped GEMMs (module
# docstring); a module setting (bench/generate.py's A/B switch, tests), not a config knob
GROUPED_EXPERTS_ON = ("cuda",)

# device types where sampling uses the fixed-shape cache, with the decode step captured as a CUDA
# graph on CUDA (module docstring); a module setting like GROUPED_EXPERTS_ON (tests, the bench's A/B)
CAPTURED_DECODE_ON = ("cuda",)
# steps between reads of the rows' stops, per device type (1 where absent: on the CPU a read costs
# nothing, and each extra step costs its full time)
STOP_CHECK_EVERY = {"cuda": 8}
# prompt tokens per prefill forward, over all rows (at least one per row): the reference attention
# makes [rows, heads, chunk, keys] fp32 scores, so a 4,096-token prompt x 64 rows in one forward
# would take ~34 GB per layer for them (by count); in chunks through the cache it takes a fraction of that
PREFILL_TOKENS = 16384

HARMONY_STOPS = (200002, 200012, 199999)  # <|return|>, <|call|>, <|endoftext|>


@torch.no_grad()
def generate(model: VpMoE, prompts: list[list[int]], max_new_tokens: int, stop_ids=HARMONY_STOPS,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, subset=None,
             pad_id: int = 199999) -> list[list[int]]:
    """Continuations (without the prompt) for each prompt; greedy when temperature == 0."""
    device = next(model.parameters()).device
    B = len(prompts)
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("generate: every prompt is empty (nothing to continue from)")
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
    """Prefill, then one token per step; [B, steps] with -1 after a row's stop."""
    B, device = ids.shape[0], ids.device
    static = device.type in CAPTURED_DECODE_ON
    cache = (StaticKVCache(model.cfg, B, ids.shape[1] + max_new_tokens, device) if static
             else model.new_cache(B))
    chunk = max(1, PREFILL_TOKENS // B)
    for start in range(0, ids.shape[1], chunk):
        part = slice(start, start + chunk)
        hidden = model(ids[:, part], cache=cache, attention_mask=mask[:, part], return_hidden=True).hidden
    # the head on the last position only: the prompt's other logits would be [B, T, V] for nothing
    logits = model.lm_head(hidden[:, -1])
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_fn = _eager_step(model, cache)
    check_every = STOP_CHECK_EVERY.get(device.type, 1)
    for step in range(max_new_tokens):
        nxt = sample(logits.float(), temperature, top_p, gen)
        full = subset.to_full(nxt) if subset is not None else nxt
        out[:, step] = torch.where(done, torch.full_like(full, -1), full)
        done |= torch.isin(full, stops)
        if step == max_new_tokens - 1:  # the last token's logits are never read
            return out
        if (step + 1) % check_every == 0 and bool(done.all()):
            return out[:, :step + 1]
        if static and device.type == "cuda" and step == 1:  # step 0 ran eagerly: the warm-up
            step_fn, logits = _captured_or_eager(model, cache, nxt[:, None], step_fn)
        else:
            logits = step_fn(nxt[:, None])
    return out


def _eager_step(model, cache):
    return lambda tokens: model(tokens, cache=cache).logits[:, -1]


def _captured_or_eager(model, cache, tokens, eager):
    """(the step function for the next steps, this step's logits): the decode step captured (it
    runs once here for `tokens`), else, with a warning, `eager`, which runs this step."""
    seen = cache.seen
    try:
        captured = CapturedDecode(model, cache, tokens)
        return captured, captured.logits
    except Exception as e:  # noqa: BLE001 (anything the capture refuses: run the steps eagerly)
        cache.seen = seen  # a failed capture ran nothing on the device
        warnings.warn(f"vpmoe.model.generate: the decode step could not be captured ({e!r:.300}); "
                      "decoding with eager launches")
        return eager, eager(tokens)


class CapturedDecode:
    """One decode step, `model(tokens [B, 1], cache).logits[:, -1]` through a `StaticKVCache`, as a
    CUDA graph: captured on the first call (after an eager step: the warm-up that CUDA graphs want
    for lazy initialisation), which it also runs, then replayed with new tokens copied into its
    input. `logits` is the graph's output buffer, rewritten by each replay."""

    def __init__(self, model, cache: StaticKVCache, tokens: torch.Tensor):
        from vpmoe.model.graphed import CAPTURE_LOCK, CAPTURE_MODE
        self.cache = cache
        self.tokens = tokens.clone()
        self.graph = torch.cuda.CUDAGraph()
        # as the train step's captures: no thread pins host memory meanwhile (a trainer's prefetch
        # thread may run beside an evaluation's sampling; graphed.py's docstring says why)
        with CAPTURE_LOCK, torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
            self.logits = model(self.tokens, cache=cache).logits[:, -1]
        self.graph.replay()  # capture recorded the step (its host count advanced): now it runs

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.reserve(1)
        self.tokens.copy_(tokens)
        self.cache.seen += 1
        self.graph.replay()
        return self.logits


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

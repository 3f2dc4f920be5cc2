"""FlexAttention for the fast paths: sinks through the log-sum-exp, ALiBi, document masks for packed
rows, and the tile and layout choices that make its backward fast at a few thousand tokens.

Design choices:
- FlexAttention with a block mask built from the document ids (and the window on local
  layers), ALiBi as a `score_mod`, GQA natively. The sink is folded in after the kernel through
  the log-sum-exp: with L = logsumexp_j s_ij, the sink-normalised output is
  `out * sigmoid(L - sink_h)`, exactly `sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij))`.
  Block masks are built outside compiled regions from a buffer of document runs that the mask
  function closes over, so a compiled block sees the same `mask_mod` object every step and never
  recompiles for new data (`DocMasks`); their block tables come from each 128-token block's first
  and last run ([B, T/128, T/128] work, not the [B, T, T] grid `create_block_mask` evaluates;
  `doc_block_tables`, its tables equal to `create_block_mask`'s; -0.29 ms per (a) step on an H200,
  docs/performance.md). FlexAttention on CPU has no backward and no LSE, so on CPU, and for cached decoding
  (queries != keys), the reference runs instead; tests/gpu/ checks the Flex path against it on
  the GPU.
- Tiles (`FLEX_KERNEL_OPTIONS`, `HOPPER_FLEX_OPTIONS`) and k/v copied out to every query head
  (`EXPAND_KV`) where the backward would have few programs: module settings the benchmarks sweep
  (bench/attention.py, bench/train_step.py), each measured where it is set.
"""
from __future__ import annotations

import math

import torch

from vpmoe.model import model as M


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on, else x's own (the experts use it too)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_flex_compiled = None
# FlexAttention's `kernel_options` per layer kind (tile sizes, e.g. {"bwd_BLOCK_N1": 64}), read while
# tracing. None: this project's choice for the device (`flex_kernel_options`); {}: torch's defaults.
# A module setting, not a config knob: bench/attention.py sweeps it (`--flex-options`),
# bench/train_step.py times the step with it (`--flex-local`, `--flex-global`).
FLEX_KERNEL_OPTIONS: dict[str, dict | None] = {"local": None, "global": None}
# Hopper: smaller backward tiles give the backward more programs (torch's 128-key tiles leave most
# of the GPU idle at a few thousand tokens). Windowed layers, measured on the H200 (docs/performance.md,
# 2026-12-03): the Flex backward kernel -16% at 4,096 tokens, -11% at 32,768; the (a) step 65.99 ->
# 65.66 ms, the (d) step 2,457 -> 2,446 ms. Global layers since 2026-12-05 (H100, bench/attention.py,
# their sub-block forward + backward): 0.661 -> 0.629 ms at 4,096 tokens, 5.866 -> 5.828 at 65,536;
# two other tilings swept there were slower (0.766, 0.820).
HOPPER_FLEX_OPTIONS = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                       "bwd_num_warps": 4}


# Flex's backward runs one dK/dV program per (key block, batch row, kv head) that visits the kv
# head's query heads in turn (GQA), so at a few thousand tokens it has ~128 programs of 4-head
# chains on 132 SMs. With k and v copied out to one kv head per query head the programs are 4x as
# many and a quarter as long; the copy and its gradient's sum are a few small kernels. Only where
# those programs would be under two per SM (training; forwards are unaffected by the head ratio).
EXPAND_KV = {"local": True, "global": True}


def expand_kv_pays(kind: str, k: torch.Tensor, n_heads: int) -> bool:
    """Whether `flex_with_sinks` copies k/v [B, G, T, D] out to `n_heads` heads for this layer kind
    (key blocks of the backward's dK/dV tile: `flex_kernel_options`, else torch's 128)."""
    if not (EXPAND_KV[kind] and k.is_cuda and k.requires_grad and torch.is_grad_enabled() and n_heads > k.shape[1]):
        return False
    B, G, T, _ = k.shape
    block_n = flex_kernel_options(kind, k.device).get("bwd_BLOCK_N1", 128)
    return B * G * -(-T // block_n) < 2 * torch.cuda.get_device_properties(k.device).multi_processor_count


def flex_kernel_options(kind: str, device: torch.device) -> dict:
    """The Flex kernel_options a layer kind ("local" / "global") traces with on `device`."""
    options = FLEX_KERNEL_OPTIONS[kind]
    if options is not None:
        return dict(options)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return dict(HOPPER_FLEX_OPTIONS)
    return {}


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


MASK_BLOCK = 128  # FlexAttention's block (create_block_mask's default)
# the block tables from the runs' block ends (`doc_block_tables`); off: `create_block_mask` over the
# [B, T, T] grid, the same tables (bench/train_step.py --mask-tables dense, for the A/B)
TABLES_FROM_RUNS = True


def doc_runs(doc: torch.Tensor) -> torch.Tensor:
    """[B, T] -> each token's document as the index of its run of equal ids along the row (int32).
    Packed rows hold each document as one contiguous run, so "same run" is "same document"; it is
    also what `model.positions_from_docs` assumes (positions restart at every change of id)."""
    change = torch.zeros_like(doc, dtype=torch.int32)
    change[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.cumsum(change, 1, dtype=torch.int32)


def doc_block_tables(run: torch.Tensor, window: int | None, block: int = MASK_BLOCK):
    """(partial, full) [B, 1, T/block, T/block] int8 block tables of the causal same-run mask (with
    `window`: also q - kv < window) straight from the runs, as `create_block_mask` finds them by
    evaluating the mask over the whole [B, T, T] grid. Runs never decrease along a row, so for q
    block i and kv block j < i: some pair shares a run iff j's last token's run is i's first
    token's, every pair does iff j's first token's run is i's last token's; the pair nearest in
    position is (i's first, j's last), the farthest (i's last, j's first). The diagonal block is
    partial (causal). T must be a multiple of `block`."""
    T = run.shape[1]
    n = T // block
    first, last = run[:, ::block], run[:, block - 1::block]  # [B, n]
    ids = torch.arange(n, device=run.device)
    gap = ids[:, None] - ids[None, :]  # q block - kv block
    near = gap >= 0
    whole = gap > 0
    if window is not None:
        near = near & (block * gap - (block - 1) < window)
        whole = whole & (block * gap + (block - 1) < window)
    some = near & ((gap == 0) | (last[:, None, :] == first[:, :, None]))  # [B, q block, kv block]
    full = whole & (first[:, None, :] == last[:, :, None])
    return (some & ~full).to(torch.int8)[:, None], full.to(torch.int8)[:, None]


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block counts and indices of a dense block table, ordered as FlexAttention orders them."""
    dense = dense.to(torch.int32)
    return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)


class DocMasks:
    """Block masks (local window / global) for packed rows, rebuilt from persistent buffers.

    `mask_mod` closes over `self.run` (each token's document run, `doc_runs`; one buffer per
    shape), so every BlockMask this object makes carries the same function: compiled code guards
    on it and does not recompile when the data changes. `update(doc)` copies new ids in and
    rebuilds the block tables (outside compiled regions) from the runs at block granularity
    (`doc_block_tables`: [B, T/128, T/128] work; `create_block_mask`, which evaluates the mask over
    [B, T, T], only where T is not a multiple of the block); with `static=True` the tables are
    copied into the first masks' tensors instead, so a captured CUDA graph that read them sees the
    new layout. A document is a run of equal ids: an id that comes back after another document is
    a new document (packed rows never do that).
    """

    def __init__(self, shape, device, window: int | None, static: bool = False):
        self.doc = torch.full(shape, -1, dtype=torch.long, device=device)
        self.run = torch.zeros(shape, dtype=torch.int32, device=device)
        self.window, self.static = window, static
        self.local = self.glob = None
        run, win = self.run, window

        def local_mod(b, h, q_idx, kv_idx):
            return (run[b, q_idx] == run[b, kv_idx]) & (kv_idx <= q_idx) & (q_idx - kv_idx < win)

        def global_mod(b, h, q_idx, kv_idx):
            return (run[b, q_idx] == run[b, kv_idx]) & (kv_idx <= q_idx)

        self._mods = ((local_mod, window), (global_mod, None))

    def _build(self, mod, window):
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask

        B, T = self.run.shape
        if T % MASK_BLOCK or not TABLES_FROM_RUNS:
            return create_block_mask(mod, B, None, T, T, device=self.run.device)
        partial, full = doc_block_tables(self.run, window)
        return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=MASK_BLOCK, mask_mod=mod,
                                        seq_lengths=(T, T))

    @torch.compiler.disable
    def update(self, doc: torch.Tensor):
        if doc is not self.doc:
            self.doc.copy_(doc)
        self.run.copy_(doc_runs(self.doc))
        fresh = [self._build(mod, window) for mod, window in self._mods]
        if self.static and self.local is not None:
            for old, new in zip((self.local, self.glob), fresh):
                for name in type(old)._TENSOR_ATTRS:
                    a, b = getattr(old, name, None), getattr(new, name, None)
                    if isinstance(a, torch.Tensor):
                        a.copy_(b)
        else:
            self.local, self.glob = fresh
        return self.local, self.glob


_mask_memo: dict = {}


@torch.compiler.disable  # memoised Python-side; built once per forward, outside compiled blocks
def document_block_mask(doc: torch.Tensor, window: int | None):
    """Block mask for `attention_flex` (the module-level hook), memoised by `doc`'s identity: the
    model passes the same `doc_ids` tensor to every layer, so one forward builds each mask once."""
    key = (tuple(doc.shape), doc.device, window)
    hit = _mask_memo.get(key)
    if hit is None or hit[0] is not doc:
        local, glob = DocMasks(doc.shape, doc.device, window or 1).update(doc)
        hit = _mask_memo[key] = (doc, local if window is not None else glob)  # holding doc keeps its id unique
    return hit[1]


def flex_with_sinks(q, k, v, sinks, block_mask, slopes=None) -> torch.Tensor:
    """FlexAttention (q [B, H, T, D], k/v [B, G, T, D], one dtype) with per-head sinks; ALiBi when
    `slopes` [H] is given. Returns [B, H, T, D] in q's dtype. Traceable by torch.compile."""
    from torch.nn.attention.flex_attention import AuxRequest

    score_mod = None
    if slopes is not None:
        def score_mod(score, b, h, q_idx, kv_idx):  # ALiBi; index distance = position distance in a doc
            return score - slopes[h] * (q_idx - kv_idx).to(score.dtype)

    kind = "local" if slopes is None else "global"
    options = flex_kernel_options(kind, q.device)
    if expand_kv_pays(kind, k, q.shape[1]):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention as flex
    else:
        flex = _flex()
    out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]),
                    enable_gqa=True, return_aux=AuxRequest(lse=True), kernel_options=options or None)
    gate = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))  # sink joins the denominator
    return (out.float() * gate.unsqueeze(-1)).to(q.dtype)


def attention_flex(q, k, v, sinks, q_pos, k_pos, q_doc, k_doc, window, slopes):
    """Same contract as `model.attention_reference`; falls back to it where Flex cannot run."""
    same_sequence = q_doc is k_doc and q.shape[2] == k.shape[2]
    if not same_sequence or q.device.type != "cuda":  # CPU Flex lacks backward and the LSE
        return M.attention_reference(q, k, v, sinks, q_pos, k_pos, q_doc, k_doc, window, slopes)
    dt = compute_dtype(q)
    mask = document_block_mask(q_doc, window)
    slopes = None if slopes is None else slopes.to(q.device, torch.float32)
    return flex_with_sinks(q.to(dt), k.to(dt), v.to(dt), sinks, mask, slopes)


M.ATTENTION_IMPLS["flex"] = attention_flex

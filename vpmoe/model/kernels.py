"""Fast paths for the train step, each tested against the reference in `model.py`.

Design choices:
- Attention: FlexAttention with a block mask built from the document ids (and the window on local
  layers), ALiBi as a `score_mod`, GQA natively. The sink is folded in after the kernel through
  the log-sum-exp: with L = logsumexp_j s_ij, the sink-normalised output is
  `out * sigmoid(L - sink_h)`, exactly `sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij))`.
  Block masks are built outside compiled regions (`create_block_mask` is not traceable) from a
  document-id buffer that the mask function closes over, so a compiled block sees the same
  `mask_mod` object every step and never recompiles for new data (`DocMasks`). FlexAttention on
  CPU has no backward and no LSE, so on CPU, and for cached decoding (queries != keys), the
  reference runs instead; tests/gpu/ checks the Flex path against it on the GPU.
- MoE routing, permutation and combine never leave the device and never sync the host:
  one stable sort of the N*k (token, slot) expert ids gives the order, the sorted expert of each
  row and (by `searchsorted`) the grouped GEMM's group ends; the inverse permutation comes from
  one scatter. Dispatch (`token rows -> sorted rows`) and combine (`sorted rows -> weighted sum
  per token`) are autograd Functions whose backward passes are gathers too (no atomics, no
  index_put), and the combine accumulates in fp32 like the reference's fp32 `index_add_`.
- Experts: two grouped GEMMs (`torch._grouped_mm`, one launch for all experts, offsets on the
  device); the bias gradients are a one-hot GEMM over the sorted rows (`_GroupBias`), not atomics. CUDA's grouped GEMM takes bf16 only; the bias add and squared ReLU run in fp32 and are
  fused by torch.compile around the GEMMs. `torch._grouped_mm` also runs on CPU in fp32, so CI
  checks this path against the loop reference; fp32 on CUDA (tests only) falls back to a loop.
"""
from __future__ import annotations

import math

import torch

from vpmoe.model import model as M

# ----------------------------------------------------------------------------------------------
# MoE


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Routing:
    """Where each of the N*k (token, slot) pairs goes; everything on the device, static shapes.

    order [M]: flat (token * k + slot) index of sorted row r; expert [M]: expert of sorted row r;
    offsets [E] int32: cumulative row counts (group ends); inverse [M]: sorted row of each flat
    index; token [M]: token of sorted row r.
    """

    def __init__(self, topk_idx: torch.Tensor, n_experts: int, first: int = 0):
        N, k = topk_idx.shape
        flat = topk_idx.flatten() - first
        self.expert, self.order = torch.sort(flat, stable=True)
        bounds = torch.arange(1, n_experts + 1, device=flat.device, dtype=flat.dtype)
        self.offsets = torch.searchsorted(self.expert, bounds - 1, right=True).to(torch.int32)
        self.inverse = torch.empty_like(self.order).scatter_(
            0, self.order, torch.arange(self.order.numel(), device=flat.device))
        self.token = self.order // k
        self.n_tokens, self.k = N, k


def permute_by_expert(topk_idx: torch.Tensor, n_experts: int, first: int = 0):
    """(order, expert_of_row, offsets int32): the N*k pairs sorted by expert (see `Routing`)."""
    r = Routing(topk_idx, n_experts, first)
    return r.order, r.expert, r.offsets


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Dispatch(torch.autograd.Function):
    """x [N, d] -> rows [M, d] with rows[r] = x[token[r]]; backward sums each token's k rows."""

    @staticmethod
    def forward(ctx, x, token, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[token]

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        N = inverse.numel() // ctx.k
        return g[inverse].view(N, ctx.k, -1).to(_acc(g)).sum(1).to(g.dtype), None, None, None


class _Combine(torch.autograd.Function):
    """rows [M, d], weights [N, k] -> y [N, d] fp32, y[t] = sum_s w[t, s] * rows[inverse[t*k+s]]."""

    @staticmethod
    def forward(ctx, rows, weight, inverse, token, order):
        N, k = weight.shape
        picked = rows[inverse].view(N, k, -1)
        ctx.save_for_backward(rows, weight, inverse, token, order)
        acc = _acc(rows)
        return (picked.to(acc) * weight.to(acc).unsqueeze(-1)).sum(1)

    @staticmethod
    def backward(ctx, g):
        rows, weight, inverse, token, order = ctx.saved_tensors
        N, k = weight.shape
        acc = _acc(rows)
        g = g.to(acc)
        g_rows = (g[token] * weight.to(acc).flatten()[order].unsqueeze(-1)).to(rows.dtype)
        g_weight = (rows[inverse].view(N, k, -1).to(acc) * g.unsqueeze(1)).sum(-1).to(weight.dtype)
        return g_rows, g_weight, None, None, None


class _GroupBias(torch.autograd.Function):
    """y [M, n] + bias[expert[r]] per row. The bias gradient is one dense GEMM, one_hot(expert)^T @ g
    ([E, M] @ [M, n]), instead of the scatter-add that indexing's backward does: rows are sorted
    by expert, so a scatter-add sends each expert's ~M/E consecutive rows at the same addresses
    (serialised atomics, measured ~0.12 ms per layer at 16k rows on an H200)."""

    @staticmethod
    def forward(ctx, y, bias, expert):
        ctx.save_for_backward(expert)
        ctx.n_groups = bias.shape[0]
        return y + bias[expert]

    @staticmethod
    def backward(ctx, g):
        (expert,) = ctx.saved_tensors
        one_hot = (expert[None, :] == torch.arange(ctx.n_groups, device=g.device)[:, None]).to(g.dtype)
        return g, one_hot @ g, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, a] (rows sorted by group) @ w[g] [a, b] per group; offsets = group ends (int32)."""
    if x.is_cuda and x.dtype != torch.bfloat16:  # CUDA's kernel is bf16-only: loop (tests only)
        out, start = x.new_zeros(x.shape[0], w.shape[-1]), 0
        for g, end in enumerate(offsets.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[g]
            start = end
        return out
    return torch._grouped_mm(x, w, offs=offsets)


def grouped_expert_ffn(xs: torch.Tensor, expert_of_row: torch.Tensor, offsets: torch.Tensor,
                       w_up, b_up, w_down, b_down) -> torch.Tensor:
    """Rows already sorted by expert: squared-ReLU expert FFN with biases via two grouped GEMMs.

    GEMMs in xs's dtype; bias + activation in fp32 (fused by compile); output in xs's dtype.
    """
    dt, acc = xs.dtype, _acc(xs)
    h = _GroupBias.apply(grouped_mm(xs, w_up.to(dt), offsets).to(acc), b_up.to(acc), expert_of_row)
    h = M.squared_relu(h).to(dt)
    return _GroupBias.apply(grouped_mm(h, w_down.to(dt), offsets).to(acc), b_down.to(acc), expert_of_row).to(dt)


def routed_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_up, b_up, w_down,
                   b_down, first: int = 0) -> torch.Tensor:
    """sum_s w[t, s] * expert_{idx[t, s]}(x[t]) for x [N, d] in the GEMM dtype; fp32 result [N, d]."""
    r = Routing(topk_idx, w_up.shape[0], first)
    xs = _Dispatch.apply(x, r.token, r.inverse, r.k)
    out = grouped_expert_ffn(xs, r.expert, r.offsets, w_up, b_up, w_down, b_down)
    return _Combine.apply(out, topk_weight, r.inverse, r.token, r.order)


def experts_grouped(moe, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Drop-in for `model.experts_loop` (MoE.dispatcher): same function, grouped GEMMs."""
    first, _ = moe.expert_range
    y = routed_experts(x.to(compute_dtype(x)), topk_idx, topk_weight, moe.w_up, moe.b_up, moe.w_down,
                       moe.b_down, first)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention

_flex_compiled = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


class DocMasks:
    """Block masks (local window / global) for packed rows, rebuilt from a persistent doc buffer.

    `mask_mod` closes over `self.doc` (one buffer per shape), so every BlockMask this object makes
    carries the same function: compiled code guards on it and does not recompile when the data
    changes. `update(doc)` copies new ids in and rebuilds the block tables (outside compiled
    regions); with `static=True` the tables are copied into the first masks' tensors instead, so a
    captured CUDA graph that read them sees the new layout.
    """

    def __init__(self, shape, device, window: int | None, static: bool = False):
        self.doc = torch.full(shape, -1, dtype=torch.long, device=device)
        self.window, self.static = window, static
        self.local = self.glob = None
        doc, win = self.doc, window

        def local_mod(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx) & (q_idx - kv_idx < win)

        def global_mod(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)

        self._mods = (local_mod, global_mod)

    @torch.compiler.disable
    def update(self, doc: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask

        if doc is not self.doc:
            self.doc.copy_(doc)
        B, T = self.doc.shape
        fresh = [create_block_mask(mod, B, None, T, T, device=self.doc.device) for mod in self._mods]
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

    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention as flex
    else:
        flex = _flex()
    out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]),
                    enable_gqa=True, return_aux=AuxRequest(lse=True))
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


def use_fast_paths(model, attention: bool = True, moe: bool = True) -> None:
    """Switch a VpMoE's modules to the fast kernels (flex attention, grouped-GEMM experts).

    This keeps the reference module structure (used for generation and eval); the train step's
    fully fused path is `vpmoe.model.fast.FastBody`."""
    model.set_impl(attention="flex" if attention else "reference", moe=experts_grouped if moe else M.experts_loop)

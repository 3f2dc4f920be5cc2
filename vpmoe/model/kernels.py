"""Fast paths for the train step, each tested against the reference in `model.py`.

Design choices:
- Attention: FlexAttention with sinks, ALiBi and document masks is `flex.py` (imported here, which
  registers it as the model's "flex" attention).
- MoE routing, permutation and combine never leave the device and never sync the host:
  one stable sort of the N*k (token, slot) expert ids gives the order, the sorted expert of each
  row and (by `searchsorted`) the grouped GEMM's group ends; the inverse permutation comes from
  one scatter. The up GEMM gathers its rows (`_GatherGemm`) and the down GEMM's rows are summed
  per token (`_DownSum`): autograd Functions whose backward passes are gathers too (no atomics,
  no index_put); the combine accumulates in fp32 like the reference's fp32 `index_add_`.
- Experts: two grouped GEMMs (`torch._grouped_mm`, one launch for all experts, offsets on the
  device) at the weights' own shapes (off the 64/128 tile grid they ran slower: `_DownSum`); the
  biases are added in the fp32 pointwise work around them. The weight gradients: where Triton
  serves, one kernel per weight that reads the gathered rows through the token index and writes
  fp32 for the master weight, the up bias's gradient beside it (`wgrad.gathered_wgrad`,
  `FUSED_WGRAD`), at micro-batches of up to `GATHERED_WGRAD_MAX_ROWS` expert rows (it loses to
  the grouped GEMMs above); else grouped GEMMs, the up one over rows carrying a ones column for the bias. The
  down bias's gradient: a token-level dense GEMM through the routing weights. No atomics, no
  separate reduction. CUDA's grouped GEMM takes
  bf16 only; the squared ReLU runs in fp32, fused by torch.compile around the GEMMs.
  `torch._grouped_mm` also runs on CPU in fp32, so CI checks this path against the loop
  reference; fp32 on CUDA (tests only) falls back to a loop.
"""
from __future__ import annotations

import torch

from vpmoe.model import model as M
from vpmoe.model import router_fused as RF
from vpmoe.model import wgrad as W

# (importing flex also registers the model's "flex" attention, for `use_fast_paths`)
from vpmoe.model.flex import compute_dtype
from vpmoe.model.grouped import (
    _acc,
    _round8,
    gather_rows_with_ones,
    grouped_mm,
    grouped_mm_t,
    grouped_mm_wgrad,
)

# ----------------------------------------------------------------------------------------------
# what the hardware allows


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def bf16_fast_path_ok(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores and FlexAttention's kernels: Ampere (sm80) and newer."""
    return capability is not None and capability >= (8, 0)


def grouped_mm_graphable(capability: tuple[int, int] | None) -> bool:
    """Whether `torch._grouped_mm` runs without a host sync, so a CUDA graph can capture it: its
    fused kernel serves sm90 and sm100 only (H100/H200, B200); elsewhere (A100, RTX, sm12x) torch
    loops over the groups after copying the offsets to the host, which capture forbids."""
    return capability is not None and capability[0] in (9, 10)


# ----------------------------------------------------------------------------------------------
# MoE


def _top_by_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, largest first: k rounds of argmax + mask.
    For small k this fuses into a few reductions under torch.compile; `torch.topk`'s radix select
    took ~0.2 ms per call on [16k, 256] (3 calls per MoE layer)."""
    cols = torch.arange(x.shape[-1], device=x.device)
    picks = []
    for i in range(k):
        j = x.argmax(-1)
        picks.append(j)
        if i + 1 < k:
            x = x.masked_fill(cols == j[:, None], float("-inf"))
    return torch.stack(picks, -1)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 operands with fp32 accumulation and an fp32 result (`torch.mm(out_dtype=)` on
    CUDA; the CPU has no such kernel, so there the operands are widened: the same products, exact
    in fp32, and the same fp32 sums up to order)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def mm_bf16x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] for fp32 operands on bf16 tensor cores at near-fp32 precision: with
    a = ah + al and b = bh + bl split into bf16 pairs, a @ b ~ ah@bh + ah@bl + al@bh (the dropped
    al@bl term and the splits leave ~2^-16 relative error, vs 2^-11 for TF32), as ONE GEMM over
    the concatenated K with fp32 accumulation and fp32 output."""
    ah, al = RF.split_hi_lo(a)
    bh, bl = RF.split_hi_lo(b)
    return mm_f32(torch.cat([ah, ah, al], 1), torch.cat([bh, bl, bh], 0))


class _RouterLogits(torch.autograd.Function):
    """x [N, d] @ w [E, d]^T: the forward in near-fp32 (`mm_bf16x3`), the two gradients as single
    bf16 GEMMs of the bf16-rounded operands with fp32 accumulation and fp32 results.

    Why the split: the logits pick experts, a discrete choice that bf16 logits (2^-9 relative)
    would flip near every tie, so they stay fp32-accurate. The gradients only join the residual
    stream's and the weights' gradients, every other one of which comes from bf16 GEMMs; fp32
    gradients (three GEMMs each at bf16x3) cost two thirds of the router's GEMM time and kept its
    fp32 input (4 KiB per token per kept block) where the experts' bf16 copy serves (the (d)
    step's peak did not move measurably: 135.1 -> 135.0 GiB). The three fp32 GEMMs first ran as
    SIMT SGEMMs (~45 TFLOP/s on an H200). On CUDA the forward is one Triton GEMM that splits x in
    registers (`router_fused`: torch's split and concatenated-K GEMM moved 1.1 GB per call at 65k
    tokens)."""

    @staticmethod
    def forward(ctx, x, w, w_low):
        xh = x.to(torch.bfloat16)  # the experts' input too: one tensor kept for both
        # w_low: w's bf16 cast made before the blocks (`dense_linear.DenseCopies`), else cast here
        ctx.save_for_backward(xh, w.to(torch.bfloat16) if w_low is None else w_low)
        if RF.available(x.device) and x.stride(-1) == 1 and w.stride(-1) == 1:  # x and w split in registers
            return RF.router_logits_fused(x, w)
        return mm_bf16x3(x, w.t())

    @staticmethod
    def backward(ctx, g):
        xh, wh = ctx.saved_tensors
        gh = g.to(torch.bfloat16)
        return mm_f32(gh, wh), mm_f32(gh.t(), xh), None


_BF16X3_OK: bool | None = None


def bf16x3_available(device: torch.device) -> bool:
    """Whether `torch.mm(out_dtype=float32)` on bf16 runs here (CUDA, torch >= 2.8); probed once, eagerly."""
    global _BF16X3_OK
    if device.type != "cuda":
        return False
    if _BF16X3_OK is None:
        try:
            a = torch.randn(16, 16, device=device)
            _BF16X3_OK = bool(torch.allclose(mm_bf16x3(a, a), a @ a, rtol=1e-3, atol=1e-3))
        except Exception:  # noqa: BLE001 - older torch: plain fp32
            _BF16X3_OK = False
    return _BF16X3_OK


def router_logits(x: torch.Tensor, w: torch.Tensor, bf16x3: bool = False,
                  w_low: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 router logits x @ w^T (autocast off): plain fp32, or on CUDA where asked the
    bf16x3 forward with bf16 gradients (`_RouterLogits`; `w_low`: w already cast to bf16)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if bf16x3 and x.is_cuda and x.dtype == torch.float32:
            return _RouterLogits.apply(x, w.float(), w_low)
        return M.wide(x) @ M.wide(w).t()


def route_fast(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, cfg,
               bf16x3: bool = False):
    """`model.route_reference` (same contract and math: fp32 sigmoid scores, bias for selection
    only, group-limited top-k, weights from unbiased scores scaled to route_scale) with the three
    `torch.topk` calls replaced by fusable work (`select_experts`). `bf16x3`: the logits GEMMs on
    tensor cores at near-fp32 precision (`router_logits`)."""
    return select_experts(torch.sigmoid(router_logits(x, router_weight, bf16x3)), expert_bias, cfg)


def select_experts(scores: torch.Tensor, expert_bias: torch.Tensor, cfg):
    """(topk_idx, topk_weight, scores) from the sigmoid scores [N, E]: the group score as the sum of
    the top `top_k // topk_groups` entries by rounds of max, the kept groups by pairwise rank (a
    group is kept if fewer than `topk_groups` groups beat it; ties go to the lower index), the
    experts by rounds of argmax. Selections equal the reference's except on exact ties. The
    reference of `route_fused`'s kernels too."""
    N, E = scores.shape
    G, per = cfg.n_groups, E // cfg.n_groups
    biased = scores + expert_bias.to(scores.dtype)
    grouped = biased.view(N, G, per)
    m = cfg.top_k // cfg.topk_groups
    if m == 1:
        group_score = grouped.amax(-1)
    else:
        gidx = _top_by_max(grouped.reshape(N * G, per), m).view(N, G, m)
        group_score = grouped.gather(-1, gidx).sum(-1)
    a, b = group_score.unsqueeze(-1), group_score.unsqueeze(-2)  # [N, G, 1] vs [N, 1, G]
    lower = torch.arange(G, device=scores.device)
    beats = (b > a) | ((b == a) & (lower[None, None, :] < lower[None, :, None]))
    keep = beats.sum(-1) < cfg.topk_groups  # [N, G]
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
    topk_idx = _top_by_max(masked, cfg.top_k)
    chosen = scores.gather(1, topk_idx)
    topk_weight = chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale
    return topk_idx, topk_weight, scores


def sort_key_dtype(n_experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds expert ids 0..n_experts-1. A radix sort passes once
    per key byte: uint8 keys (E <= 256) take one pass where int64 takes eight (H200, 65k tokens x
    top-4: 90 -> 29 us; bench/routing_sort.py)."""
    return torch.uint8 if n_experts <= 256 else torch.int16 if n_experts <= 2**15 else torch.int32


def sort_by_expert(topk_idx: torch.Tensor, n_experts: int, first: int = 0):
    """(expert, order, offsets): the N*k (token, slot) pairs' experts sorted (stable), the flat
    index of each sorted row and the int32 group ends, on the device (see `Routing`). The sort
    runs on narrow keys (`sort_key_dtype`); `expert` comes back int64 (a uint8 index would be
    read as a mask)."""
    keys = (topk_idx.flatten() - first).to(sort_key_dtype(n_experts))
    expert, order = torch.sort(keys, stable=True)
    expert = expert.long()
    bounds = torch.arange(n_experts, device=keys.device, dtype=expert.dtype)
    return expert, order, torch.searchsorted(expert, bounds, right=True).to(torch.int32)


class Routing:
    """Where each of the N*k (token, slot) pairs goes; everything on the device, static shapes.

    order [M]: flat (token * k + slot) index of sorted row r; expert [M]: expert of sorted row r;
    offsets [E] int32: cumulative row counts (group ends); inverse [M]: sorted row of each flat
    index; token [M]: token of sorted row r.
    """

    def __init__(self, topk_idx: torch.Tensor, n_experts: int, first: int = 0):
        N, k = topk_idx.shape
        self.expert, self.order, self.offsets = sort_by_expert(topk_idx, n_experts, first)
        self.inverse = torch.empty_like(self.order).scatter_(
            0, self.order, torch.arange(self.order.numel(), device=self.order.device))
        self.token = self.order // k
        self.n_tokens, self.k = N, k


def permute_by_expert(topk_idx: torch.Tensor, n_experts: int, first: int = 0):
    """(order, expert_of_row, offsets int32): the N*k pairs sorted by expert (see `Routing`)."""
    r = Routing(topk_idx, n_experts, first)
    return r.order, r.expert, r.offsets


def sum_slots(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """rows [N*k, n] sorted by expert -> [N, n] in the accumulation dtype: each token's k rows
    summed (gather-only, no atomics); `inverse` = the sorted row of each (token, slot) pair."""
    return rows[inverse].view(inverse.numel() // k, k, -1).to(_acc(rows)).sum(1)


# The experts' weight gradients in fp32 from `wgrad.gathered_wgrad` where Triton serves (rows
# read through the token index) instead of a bf16 grouped GEMM and a cast: (a) 61.51 -> 60.34 ms
# (H200, docs/performance.md 2026-12-04). Off: the grouped GEMMs (`bench/train_step.py --moe grouped_mm_wgrad`).
FUSED_WGRAD = True
# ... but only up to this many expert rows (tokens x k) per micro-batch: the kernel wins at (a)'s
# 16,384 and loses at (b)'s 65,536 (128.7 vs 125.1 ms per step) and (d)'s 262,144 (2,741 vs
# 2,443 ms), H200, 2026-12-04 21:00-21:20 (bench/RESULTS.md). The crossover itself is not
# measured: a straight line through the per-call differences at (a) and (b) puts it near 27k.
GATHERED_WGRAD_MAX_ROWS = 24576
# ... and its programs take the experts busiest first (`wgrad.busiest_first`, one small sort per MoE
# layer in the forward, kept for both weight gradients): the longest row loops start first.
WGRAD_BUSIEST_FIRST = True


def gathered_wgrad_serves(rows: int) -> bool:
    """Whether a micro-batch of `rows` expert rows takes its expert weight gradients from
    `wgrad.gathered_wgrad` (fp32, straight into the master weights' gradients; where Triton also
    serves the operands, `wgrad.wgrad_applies`) rather than bf16 grouped GEMMs and a cast.
    Shapes are static where this is traced, so the choice is fixed per compiled graph."""
    return FUSED_WGRAD and rows <= GATHERED_WGRAD_MAX_ROWS


class _GatherGemm(torch.autograd.Function):
    """h = x[token[r]] @ w[e] + b[e] (in x's dtype) for each sorted row r of expert group e (group
    ends `offsets`, `expert` [M] the group of each row); x in the GEMM dtype; w cast to x's dtype
    here and its gradient returned in w's own dtype (the fp32 master weight with FUSED_WGRAD).

    The forward GEMM and the input-gradient GEMM run at the weight's own shape (1024 x 128: whole
    tiles; a ones column made them 1032 wide, measured 7-33% slower alone). The weight gradient: a
    grouped GEMM over rows gathered again with a ones column (`gather_rows_with_ones`) gives the
    bias gradient as its row `a`, with no scatter and no atomics; with `FUSED_WGRAD` where Triton
    serves, one Triton kernel reads x's rows through `token`, sums the bias gradient beside it and
    writes fp32 (`wgrad.gathered_wgrad`). Keeps x [N, a], not the gathered rows [N*k, a].
    The input gradient sums each token's k rows (gather-only). `probe` (optional, unused forward):
    its gradient is the kernel's partial sums of the weight gradient's squares (`sq_probe`). `w_lo`
    (optional): w already in x's dtype (a kept copy, `FastBody.use_weight_copies`), used instead
    of casting w here. `grad_to` (optional, `wgrad.grad_holder`): takes w's gradient in its own dtype
    (bf16: the kernel rounds its fp32 sums once; its sums of squares are the rounded values'), and
    w none; else w takes it. `busiest` (optional, `wgrad.busiest_first(offsets)`): the order the
    kernel takes the experts in."""

    @staticmethod
    def forward(ctx, x, w, b, token, expert, inverse, offsets, k: int, probe=None, w_lo=None, grad_to=None,
                busiest=None):
        ctx.low_grad = W.takes_grad(ctx, grad_to, 10)
        w_lo = w.to(x.dtype) if w_lo is None else w_lo
        ctx.save_for_backward(x, w_lo, token, inverse, offsets, busiest)
        ctx.k, ctx.w_dtype, ctx.b_dtype, ctx.probe = k, w.dtype, b.dtype, probe is not None
        acc = _acc(x)  # h in x's dtype: the squared ReLU's backward keeps it (2 KB per token in fp32)
        return (grouped_mm(x[token], w_lo, offsets).to(acc) + b.to(acc)[expert]).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, w, token, inverse, offsets, busiest = ctx.saved_tensors
        a = x.shape[1]
        g = g.to(w.dtype).contiguous()
        g_sq = None  # the probe's gradient: only where the kernel writes the weight's own gradient
        if gathered_wgrad_serves(token.numel()) and W.wgrad_applies(x, g, offsets.numel()):
            g_w, g_b, g_sq = W.gathered_wgrad(x, g, token, offsets, True, True, ctx.probe, ctx.low_grad, busiest)
        else:
            g_wb = grouped_mm_wgrad(gather_rows_with_ones(x, token, _round8(a + 1)), g, offsets)
            g_w, g_b = g_wb[:, :a].contiguous(), g_wb[:, a]
        g_x = sum_slots(grouped_mm_t(g, w, offsets), inverse, ctx.k).to(x.dtype)
        g_w, g_sq, g_low = W.route_weight_grads(ctx, g_w, g_sq)
        return g_x, g_w, g_b.to(ctx.b_dtype), None, None, None, None, None, g_sq, None, g_low, None


class _DownSum(torch.autograd.Function):
    """y[t] = sum over token t's slots s of (u[r] @ w[e] + c[t, s] * b[e]) (fp32 [N, n]) with
    e = e_tok[t, s] and r its sorted row: u [M, a] the down GEMM's input rows sorted by expert
    (already scaled by their routing weights), c [N, k] and e_tok [N, k] the routing weights and
    local experts in token order, as the router made them (no gather back from the sorted order).

    All grouped GEMMs run at the weight's own shapes: a ones column made the forward's K and the
    input gradient's N 136 instead of 128 (measured 18-24% slower alone), and the weight gradient's
    136 output rows pushed CUTLASS from its 64 x 128 tiles to 128 x 256 ones, half of them padding
    (880 us per call in the 80-layer step at 65k tokens; 226 us at 128 rows alone). The bias term
    is added inside the slot sum (a gather of b's rows). Its gradients are token-level dense GEMMs
    through D [N, E], the routing weights scattered to their experts: d b = D^T g, and the routing
    weight's part <g[t], b[e]> read from g b^T [N, E]. Nothing [N*k, n]-sized is kept for backward:
    the rows' gradients are gathered from g again. w is cast to u's dtype here (the fp32 master
    weight arrives with FUSED_WGRAD); its gradient comes from a grouped GEMM, or with `FUSED_WGRAD`
    where Triton serves in fp32 from `wgrad.gathered_wgrad` (reading g's rows through `token`);
    `probe`, `w_lo`, `grad_to` and `busiest` as in `_GatherGemm`."""

    @staticmethod
    def forward(ctx, u, c, w, b, e_tok, inverse, token, offsets, probe=None, w_lo=None, grad_to=None, busiest=None):
        ctx.low_grad = W.takes_grad(ctx, grad_to, 10)
        w_dtype, w = w.dtype, (w.to(u.dtype) if w_lo is None else w_lo)
        ctx.save_for_backward(u, c, w, b, e_tok, token, offsets, busiest)
        ctx.w_dtype, ctx.probe = w_dtype, probe is not None
        acc = _acc(u)
        # the bias term in (token, slot) order, a reduction over each token's k rows of b
        bias = (c.to(acc).unsqueeze(-1) * b.to(acc)[e_tok]).sum(1)
        return sum_slots(grouped_mm(u, w, offsets), inverse, e_tok.shape[1]) + bias

    @staticmethod
    def backward(ctx, g):
        u, c, w, b, e_tok, token, offsets, busiest = ctx.saved_tensors
        dt = u.dtype
        g_lo = g.to(dt)
        g_rows = g_lo[token]
        g_u = grouped_mm_t(g_rows, w, offsets)
        g_sq = None
        if gathered_wgrad_serves(token.numel()) and W.wgrad_applies(u, g_lo, offsets.numel()):
            g_w, _, g_sq = W.gathered_wgrad(u, g_lo, token, offsets, False, False, ctx.probe, ctx.low_grad, busiest)
        else:
            g_w = grouped_mm_wgrad(u, g_rows, offsets)
        dense = torch.zeros(g.shape[0], b.shape[0], dtype=dt, device=g.device).scatter_(
            1, e_tok, c.to(dt))  # D: each token's routing weights at its experts
        g_b = dense.t() @ g_lo
        g_c = (g_lo @ b.to(dt).t()).gather(1, e_tok)
        g_w, g_sq, g_low = W.route_weight_grads(ctx, g_w, g_sq)
        return g_u, g_c.to(c.dtype), g_w, g_b.to(b.dtype), None, None, None, None, g_sq, None, g_low, None


def routed_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_up, b_up, w_down,
                   b_down, first: int = 0, probes=(None, None), low=(None, None),
                   grad_to=(None, None)) -> torch.Tensor:
    """sum_s w[t, s] * expert_{idx[t, s]}(x[t]) for x [N, d] in the GEMM dtype; fp32 result [N, d].

    Six grouped GEMMs at the weights' own shapes, but for the up weight gradient, whose rows carry
    a ones column for the bias gradient (`_GatherGemm`, `_DownSum`). No [N*k, d] tensor is kept
    for backward: the up GEMM's rows are gathered again in backward, and each row's routing weight
    scales the down GEMM's input (w * act W + w * b), so the slot sum needs no weights and the
    routing weight's gradient is <act, the GEMM's input gradient> + <g, b>. `probes` (up, down):
    optional leaves of `sq_probe`'s shape whose gradients become the weight gradients' partial sums
    of squares where the Triton kernel writes them (else they get none). `low` (up, down): the
    weights already in x's dtype (kept copies: no cast anywhere), or None. `grad_to` (up, down):
    `wgrad.grad_holder`s that take the weights' gradients in bf16 instead of the masters, or None."""
    r = Routing(topk_idx, w_up.shape[0], first)
    dt, acc = x.dtype, _acc(x)
    # the Functions take the master weights (their gradients then come back in the master's dtype,
    # or bf16 to a holder) where the gathered kernel serves or copies are kept; else the weights
    # are cast here and the cast's backward widens their bf16 gradients, if a holder does not take
    # them (a compiled block's partitioner may then recompute the cast rather than keep it)
    serves = gathered_wgrad_serves(r.token.numel())
    if not serves and low[0] is None:
        w_up, w_down = w_up.to(dt), w_down.to(dt)
    # the order only where a backward will use it (no sort in sampling's forward steps)
    wanted = serves and WGRAD_BUSIEST_FIRST and torch.is_grad_enabled() and W.available(x.device)
    busiest = W.busiest_first(r.offsets) if wanted else None
    h = _GatherGemm.apply(x, w_up, b_up, r.token, r.expert, r.inverse, r.offsets, r.k, probes[0], low[0],
                          grad_to[0], busiest)
    row_weight = topk_weight.flatten()[r.order].to(acc)
    u = (M.squared_relu(h.to(acc)) * row_weight.unsqueeze(-1)).to(dt)
    return _DownSum.apply(u, topk_weight, w_down, b_down, topk_idx - first, r.inverse, r.token, r.offsets, probes[1],
                          low[1], grad_to[1], busiest)


def sq_probe(w: torch.Tensor) -> torch.Tensor:
    """A fresh leaf for `routed_experts(probes=...)` for the expert weight w [E, a, n]: its gradient
    after a backward holds that backward's weight-gradient partial sums of squares (`wgrad.sq_shape`)."""
    return torch.empty(W.sq_shape(*w.shape), dtype=torch.float32, device=w.device, requires_grad=True)


def experts_grouped(moe, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Drop-in for `model.experts_loop` (MoE.dispatcher): same function, grouped GEMMs."""
    first, _ = moe.expert_range
    y = routed_experts(x.to(compute_dtype(x)), topk_idx, topk_weight, moe.w_up, moe.b_up, moe.w_down,
                       moe.b_down, first)
    return y.to(x.dtype)


def use_fast_paths(model, attention: bool = True, moe: bool = True) -> None:
    """Switch a VpMoE's modules to the fast kernels (flex attention, grouped-GEMM experts).

    This keeps the reference module structure (used for generation and eval); the train step's
    fully fused path is `vpmoe.model.fast.FastBody`."""
    model.set_impl(attention="flex" if attention else "reference", moe=experts_grouped if moe else M.experts_loop)

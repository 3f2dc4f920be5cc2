"""The router's selection as one Triton kernel each way: from the fp32 logits [N, E] to the experts,
their combine weights and the balance statistics, with no [N, E] intermediate written.

`kernels.route_fast` does the same math as torch work that Inductor fuses into ~9 kernels forward
(sigmoid, group maxima, group ranks, rounds of argmax, the chosen scores, the weights, the aux
loss's two reductions) plus the load counts' fills and scatters, and ~3 backward; at 4,096 tokens
each is a few microseconds of launch and ramp for a few MB. Here one program takes a block of
tokens of one batch row with all E experts in registers:

- forward (`route_select`): s = sigmoid(logits), group scores max(s + bias) over each group, the
  `topk_groups` best groups by pairwise rank (ties to the lower group), then `top_k` rounds of
  argmax over the kept experts (ties to the lower expert: `torch.argmax`'s rule, as route_fast's
  `_top_by_max`); weights = chosen s / their sum * route_scale. Beside them, per program, the two
  partial sums the DeepSeek-V3 sequence-wise balance loss needs: sum_t s[t, e] / sum_e' s[t, e']
  and the selection counts. Partials, not atomics: the row sums are then deterministic (torch sums
  the [programs, E] partials per batch row; `route_with_stats`).
- backward (`route_select_backward`): the gradient of the logits from the weights' gradient and the
  probability partials' gradient, recomputing s from the logits (the op saves the logits and the
  selections, nothing else [N, E]).

Design choices:
- Only vpMoE's shape of routing: every size a power of two (E, groups, experts per group, top_k)
  and one expert per group in the group score (`top_k // topk_groups == 1`); `applies` says so and
  `route_with_stats` falls back to `kernels.select_experts` + `model.sequence_aux_loss` elsewhere,
  and off CUDA (the CPU runs the kernels only under the Triton interpreter, in tests).
- Selections equal route_fast's except on exact ties of fp32 values (the same comparisons in the
  same order); weights and gradients to fp32 rounding (tests/test_route_fused.py under the Triton
  interpreter against `kernels.select_experts` in fp32 and float64, tests/gpu/ against the torch
  path).
- `ROUTE_KERNEL` (on by default) switches the fast body's `route_with_stats` to it. Measured in the
  (a) step (H100, 2026-12-07, interleaved): 52.10 / 52.06 ms off, 51.69 / 51.68 ms on (-0.8%).
"""
from __future__ import annotations

import torch

from vpmoe.model import kernels as K
from vpmoe.model import model as M
from vpmoe.model.tpa_fused import available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kernels.route_fast
    triton = None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def applies(logits: torch.Tensor, cfg) -> bool:
    """Whether the kernels serve this routing: fp32 logits on a device Triton serves, every size a
    power of two (Triton's block shapes), one expert per group in the group score."""
    E, G = cfg.n_experts, cfg.n_groups
    return (available(logits.device) and logits.dtype == torch.float32 and logits.shape[-1] == E
            and E % G == 0 and all(_pow2(n) for n in (E, G, E // G, cfg.top_k))
            and cfg.top_k // cfg.topk_groups == 1 and cfg.top_k <= E // G * cfg.topk_groups)


WARPS = 8  # 16 tokens x 256 experts: 16 fp32 values a thread per [tokens, E] tensor


def _tokens_per_program(E: int) -> int:
    """Tokens per program (16 at E = 256; the interpreter takes the same, so tests cross partial
    blocks with short rows)."""
    return max(1, min(16, 4096 // E))


if triton is not None:
    @triton.jit
    def _scores(logits_ptr, b, j, T, E: tl.constexpr, BN: tl.constexpr):
        """This program's tokens (rows of the flat [B * T, E] logits), which are real, and s."""
        t = j * BN + tl.arange(0, BN)
        ok = t < T
        rows = (b * T + t).to(tl.int64)
        cols = tl.arange(0, E)
        x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=ok[:, None], other=0.0)
        return rows, ok, cols, 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _select_kernel(logits_ptr, bias_ptr, idx_ptr, w_ptr, prob_ptr, count_ptr, T, J, scale,
                       E: tl.constexpr, G: tl.constexpr, KG: tl.constexpr, K: tl.constexpr, BN: tl.constexpr):
        b, j = tl.program_id(0), tl.program_id(1)
        rows, ok, cols, s = _scores(logits_ptr, b, j, T, E, BN)
        biased = s + tl.load(bias_ptr + cols)[None, :]
        group = tl.max(tl.reshape(biased, (BN, G, E // G)), axis=2)  # [BN, G]
        gi = tl.arange(0, G)
        mine, other = group[:, :, None], group[:, None, :]  # [BN, G, 1] vs [BN, 1, G]
        beats = (other > mine) | ((other == mine) & (gi[None, None, :] < gi[None, :, None]))
        keep = tl.sum(beats.to(tl.int32), axis=2) < KG  # [BN, G]
        keep = tl.reshape(tl.broadcast_to(keep[:, :, None], (BN, G, E // G)), (BN, E))
        masked = tl.where(keep, biased, float("-inf"))
        ks = tl.arange(0, K)
        picked = tl.zeros((BN, K), dtype=tl.int32)
        chosen = tl.zeros((BN, K), dtype=tl.float32)
        selected = tl.zeros((BN, E), dtype=tl.int32)
        for i in tl.static_range(K):
            top = tl.argmax(masked, axis=1)  # the first of equal maxima, as torch.argmax
            hit = cols[None, :] == top[:, None]
            picked = tl.where(ks[None, :] == i, top[:, None], picked)
            chosen = tl.where(ks[None, :] == i, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], chosen)
            selected += hit.to(tl.int32)
            masked = tl.where(hit, float("-inf"), masked)
        weight = chosen / tl.sum(chosen, axis=1)[:, None] * scale
        out = rows[:, None] * K + ks[None, :]
        tl.store(idx_ptr + out, picked.to(tl.int64), mask=ok[:, None])
        tl.store(w_ptr + out, weight, mask=ok[:, None])
        share = tl.where(ok[:, None], s / tl.sum(s, axis=1)[:, None], 0.0)
        part = (b * J + j) * E + cols
        tl.store(prob_ptr + part, tl.sum(share, axis=0))
        tl.store(count_ptr + part, tl.sum(tl.where(ok[:, None], selected, 0), axis=0))

    @triton.jit
    def _select_backward_kernel(logits_ptr, idx_ptr, gw_ptr, gprob_ptr, glogits_ptr, T, J, scale,
                                E: tl.constexpr, K: tl.constexpr, BN: tl.constexpr):
        b, j = tl.program_id(0), tl.program_id(1)
        rows, ok, cols, s = _scores(logits_ptr, b, j, T, E, BN)
        # the probability partial: d/ds[t, e] of sum_e' gp[e'] s[t, e'] / R_t, R_t = sum_e' s[t, e']
        gp = tl.load(gprob_ptr + (b * J + j) * E + cols)[None, :]
        total = tl.sum(s, axis=1)[:, None]
        ds = gp / total - tl.sum(gp * s, axis=1)[:, None] / (total * total)
        # the weights: w_i = scale * s[t, idx_i] / S_t, S_t = sum_i s[t, idx_i]
        ks = tl.arange(0, K)
        out = rows[:, None] * K + ks[None, :]
        idx = tl.load(idx_ptr + out, mask=ok[:, None], other=0).to(tl.int32)
        gw = tl.load(gw_ptr + out, mask=ok[:, None], other=0.0)
        chosen = tl.zeros((BN, K), dtype=tl.float32)
        for i in tl.static_range(K):
            top = tl.sum(tl.where(ks[None, :] == i, idx, 0), axis=1)
            hit = cols[None, :] == top[:, None]
            chosen = tl.where(ks[None, :] == i, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], chosen)
        S = tl.sum(chosen, axis=1)[:, None]
        g_chosen = scale * (gw / S - tl.sum(gw * chosen, axis=1)[:, None] / (S * S))  # [BN, K]
        for i in tl.static_range(K):
            top = tl.sum(tl.where(ks[None, :] == i, idx, 0), axis=1)
            g_i = tl.sum(tl.where(ks[None, :] == i, g_chosen, 0.0), axis=1)
            ds += tl.where(cols[None, :] == top[:, None], g_i[:, None], 0.0)
        grad = ds * s * (1.0 - s)
        tl.store(glogits_ptr + rows[:, None] * E + cols[None, :], grad, mask=ok[:, None])


def _grid(logits: torch.Tensor, T: int) -> tuple[int, int, int]:
    BN = _tokens_per_program(logits.shape[1])
    return logits.shape[0] // T, triton.cdiv(T, BN), BN


def _check(logits: torch.Tensor, T: int) -> None:
    if triton is None:
        raise RuntimeError("route_select: Triton is not installed (use kernels.route_fast)")
    if logits.dtype != torch.float32 or logits.dim() != 2 or T <= 0 or logits.shape[0] % T:
        raise ValueError(f"route_select: wants fp32 logits [B * T, E] with T = {T} dividing the rows; got "
                         f"{tuple(logits.shape)} {logits.dtype}")


def _outputs(logits: torch.Tensor, T: int, top_k: int):
    N, E = logits.shape
    parts = N // T * triton.cdiv(T, _tokens_per_program(E)) if triton is not None else 0
    return (logits.new_empty(N, top_k, dtype=torch.int64), logits.new_empty(N, top_k),
            logits.new_empty(parts, E), logits.new_empty(parts, E, dtype=torch.int32))


@torch.library.custom_op("vpmoe::route_select", mutates_args=())
def route_select(logits: torch.Tensor, bias: torch.Tensor, T: int, top_k: int, n_groups: int, topk_groups: int,
                 route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_idx [N, k] int64, topk_weight [N, k] fp32, prob_part [P, E] fp32, count_part [P, E]
    int32) from fp32 logits [N, E] of B = N / T rows of T tokens: the selection of route_fast and,
    per program p (row p // (P / B)), the partial sums of s / sum(s) and of the selections."""
    _check(logits, T)
    idx, weight, prob_part, count_part = _outputs(logits, T, top_k)
    B, J, BN = _grid(logits, T)
    _select_kernel[(B, J)](logits.contiguous(), bias.float().contiguous(), idx, weight, prob_part, count_part, T, J,
                           route_scale, E=logits.shape[1], G=n_groups, KG=topk_groups, K=top_k, BN=BN, num_warps=WARPS)
    return idx, weight, prob_part, count_part


@route_select.register_fake
def _(logits, bias, T, top_k, n_groups, topk_groups, route_scale):
    return _outputs(logits, T, top_k)


@torch.library.custom_op("vpmoe::route_select_backward", mutates_args=())
def route_select_backward(logits: torch.Tensor, idx: torch.Tensor, g_weight: torch.Tensor, g_prob: torch.Tensor,
                          T: int, route_scale: float) -> torch.Tensor:
    """The logits' gradient [N, E] fp32 from the weights' [N, k] and the probability partials' [P, E]."""
    _check(logits, T)
    glogits = torch.empty_like(logits)
    B, J, BN = _grid(logits, T)
    _select_backward_kernel[(B, J)](logits.contiguous(), idx.contiguous(), g_weight.float().contiguous(),
                                    g_prob.float().contiguous(), glogits, T, J, route_scale,
                                    E=logits.shape[1], K=idx.shape[1], BN=BN, num_warps=WARPS)
    return glogits


@route_select_backward.register_fake
def _(logits, idx, g_weight, g_prob, T, route_scale):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, _, T, _, _, _, route_scale = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.T, ctx.route_scale = T, route_scale


def _backward(ctx, _g_idx, g_weight, g_prob, _g_count):
    logits, idx = ctx.saved_tensors
    # an output that did not reach the loss (the aux loss off) has no gradient: zeros
    g_weight = torch.zeros(idx.shape, device=logits.device) if g_weight is None else g_weight
    if g_prob is None:
        B, J, _ = _grid(logits, ctx.T)
        g_prob = torch.zeros(B * J, logits.shape[1], device=logits.device)
    return route_select_backward(logits, idx, g_weight, g_prob, ctx.T, ctx.route_scale), None, None, None, None, None, None


route_select.register_autograd(_backward, setup_context=_setup_context)


def stats_from_parts(prob_part: torch.Tensor, count_part: torch.Tensor, n_rows: int, T: int,
                     cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux loss, load [E] int64) from the kernel's partials of `n_rows` batch rows of T tokens:
    per row P_e = mean_t s_e / sum s and f_e = E / (k T) * (selections of e), L = mean over rows
    of sum_e f_e P_e (`model.sequence_aux_loss`); the load is the selections summed over rows."""
    E = prob_part.shape[1]
    counts = count_part.view(n_rows, -1, E).sum(1)  # [B, E] int64
    load = counts.sum(0)
    if cfg.aux_loss_coef <= 0:
        return prob_part.new_zeros(()), load
    return M.balance_loss(prob_part.view(n_rows, -1, E).sum(1) / T, counts, T, cfg), load


# The fast body's routing by these kernels (`route_with_stats`) instead of `kernels.select_experts` +
# the aux loss + the load counts as torch work for Inductor: (a) 52.10 / 52.06 -> 51.69 / 51.68 ms
# (H100, 2026-12-07 18:48-18:57, interleaved). False: the torch path, the tests' second code path.
ROUTE_KERNEL = True


def route_with_stats(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor, cfg, n_rows: int,
                     bf16x3: bool = False, router_low: torch.Tensor | None = None):
    """(topk_idx [N, k], topk_weight [N, k], aux loss, load [E] int64) for x [n_rows * T, d]: the
    routing of `kernels.route_fast`, `model.sequence_aux_loss` over the n_rows batch rows (zero
    when `aux_loss_coef` is 0) and the selections per expert; with `ROUTE_KERNEL` where the kernels
    apply, all of it from the same logits by `route_select`. `router_low`: the router weight's bf16
    cast made before the blocks (`dense_linear.DenseCopies`), for the logits' backward."""
    logits = K.router_logits(x, router_weight, bf16x3, router_low)
    T = x.shape[0] // n_rows
    if ROUTE_KERNEL and applies(logits, cfg):
        idx, weight, prob_part, count_part = route_select(logits, expert_bias, T, cfg.top_k, cfg.n_groups,
                                                          cfg.topk_groups, cfg.route_scale)
        return (idx, weight, *stats_from_parts(prob_part, count_part, n_rows, T, cfg))
    idx, weight, scores = K.select_experts(torch.sigmoid(logits), expert_bias, cfg)
    aux = M.sequence_aux_loss(scores, idx, n_rows, cfg) if cfg.aux_loss_coef > 0 else scores.new_zeros(())
    flat = idx.flatten()
    load = torch.zeros(cfg.n_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    return idx, weight, aux, load

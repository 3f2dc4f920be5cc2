"""The local-attention prologue as one Triton kernel each way: TPA contraction, bias, QK-norm and
GRAPE rotation, from the projection GEMM's output straight to Flex's [B, heads, T, D] inputs.

Local layers compute q, k, v from one GEMM output `proj` [N, 1064] (N = B * T tokens; the columns
are a_q | b_q | a_k | b_k | a_v | b_v), then per token and head
    x[h, :] = sum_r a[h, r] * b[r, :] / R + bias[h, :]            (q, k and v)
    n = x * rsqrt(mean(x^2) + eps) * w;  out = rotate(n, cos, sin)  (q and k)
Written as Inductor pointwise and reduction work this measured ~450 us forward + backward per
layer per 8k tokens on an H200, several times its memory traffic (docs/performance.md). Here one
program handles a block of tokens for all heads: it reads the token's 1064 values once and writes
q and k in bf16 and v in fp32 (v is mixed with the first layer's values in fp32 afterwards), and the
backward recomputes the forward from `proj` instead of saving anything.

Design choices:
- `tpa_prologue` is a `torch.library.custom_op` with a registered backward (another custom op):
  opaque to torch.compile (fullgraph blocks keep 0 graph breaks), capturable in CUDA graphs (no host
  sync, fixed grid for fixed shapes), and it runs under activation checkpointing like any op.
- Registers decide the speed: tiles are 2-D [tokens, D/2] (q and k as two halves, for the
  rotation), the TPA rank is unrolled into up to four slots of such tiles, heads are a loop (one
  head's tiles live at a time), offsets are int32. The first version's [BN, R, D/2] tiles took
  191-255 registers per thread (ptxas, sm_90) in every configuration, spilling in half of them;
  this one 114-188 in the backward, none spilling (80-128 as a launch compiles it:
  bench/kernel_registers.py since 2026-12-06). H200, per local layer per 8k tokens: backward
  215 -> 179 us, forward 33 -> 21 us (bench/RESULTS.md, 2026-12-01 14:46), still several times
  its memory traffic.
- Reductions over tokens (bias and norm-weight gradients): each backward program sums them over
  its token blocks (read-modify-write of its own row, a barrier between blocks) into a
  [programs, (H + 2G) * D + 2D] fp32 buffer (1792 columns at vpMoE's dims), summed by torch
  afterwards: no atomics, deterministic.
- Tokens per block, blocks per program and warps are autotuned per (token count, sequence length,
  dtypes) at first use on CUDA (`triton.autotune`; the tuning runs reset the partial sums). Short
  programs (8 or fewer tokens) are tried only where they launch at most SHORT_MAX_PROGRAMS
  (`backward_configs`), which bounds the partial-sum buffer; they serve small batches.
- Both ops are tagged `needs_fixed_stride_order` (Inductor's default for a custom op is its traced
  strides exactly): Inductor pads the projection GEMM's rows (1064 -> 1088 columns in bf16) and with
  exact strides copied them into a 1064-wide buffer before the op (seen in the H100's generated code,
  2026-12-07) and, on the CPU, again before the backward op: 8.7 MB a copy per local layer at (a).
  The kernels take any row stride, so the padded buffer is passed as it is (tests/test_tpa_fused.py
  compiles the pair on the CPU with Inductor's padding on and checks both calls). A projection whose
  columns are strided is copied.
- cos/sin [N, D/2] are inputs (computed by torch from positions and the learnable GRAPE
  frequencies), so the op returns their gradients and autograd carries them to `log_freq`.
- Math in fp32 whatever the storage dtype. `tpa_prologue_reference` is the same function in plain
  torch (any dtype, float64 for tests); `local_qkv` (the entry point) runs it wherever the
  kernels cannot (CPU without the Triton interpreter, other head sizes), so callers work
  everywhere. Tests: tests/test_tpa_fused.py runs the kernels under the Triton interpreter (CPU)
  against float64; tests/gpu/test_gpu_tpa_prologue.py on the GPU.
"""
from __future__ import annotations

import os

import torch

from vpmoe.model.model import rotate, tpa_product

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the op falls back to the reference
    triton = None

# Tuned per token count on first use. Forward: (tokens per program, warps). Backward: (tokens per
# block, blocks per program, warps): a program sums its blocks' bias/norm-weight gradients before
# writing one partial-sum row, so fewer, longer programs write fewer rows at large token counts.
FORWARD_CONFIGS = [(4, 2), (4, 4), (8, 4), (8, 8), (16, 8)]
BACKWARD_CONFIGS = [(2, 16, 2), (2, 16, 4), (4, 8, 4), (4, 16, 4), (8, 8, 8)]
# Short programs for small token counts, tried where they launch at most SHORT_MAX_PROGRAMS: at (a)'s
# 4,096 tokens every config above launched at most 128 programs (one per SM, 2-4 warps resident of
# the 8-16 their registers allow) and the backward took 149 us per local layer (H200, the 2026-12-04
# 20:57 profile), against 179 us at 8,192 tokens (2026-12-01 14:46): time followed one program's chain.
SHORT_BACKWARD_CONFIGS = [(2, 4, 2), (2, 4, 4), (4, 2, 4), (2, 2, 2)]
SHORT_MAX_PROGRAMS = 2048  # 14.7 MB of partial sums at vpMoE's dims
MAX_RANK = 4  # rank slots of the kernels


def _programs(N: int, config) -> int:
    return -(-N // (config[0] * config[1]))


def backward_configs(N: int) -> list[tuple[int, int, int]]:
    """The backward configs tried for N tokens: every long one, and the short ones that launch at
    most SHORT_MAX_PROGRAMS programs."""
    return BACKWARD_CONFIGS + [c for c in SHORT_BACKWARD_CONFIGS if _programs(N, c) <= SHORT_MAX_PROGRAMS]


def partial_rows(N: int) -> int:
    """Rows of the backward's partial-sum buffer for N tokens: the most programs any tried config launches."""
    return max(_programs(N, c) for c in backward_configs(N))


def _prune_backward(configs, named_args, **kwargs):
    """Triton's `early_config_prune`: the configs `backward_configs` keeps for this call's N."""
    kept = {(bn, blocks) for bn, blocks, _ in backward_configs(named_args["N"])}
    return [c for c in configs if (c.kwargs["BN"], c.kwargs["BLOCKS"]) in kept]


def available(device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors on `device` (CUDA with Triton, or the interpreter)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreting()


def interpreting() -> bool:
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def autotuned(kernel, configs, key: list[str]):
    """`kernel` autotuned over `configs` ((BM, BN, BK, warps, stages) each) per `key` on CUDA; as it
    is under the interpreter, which has no driver to time with (its callers pass small tiles)."""
    if interpreting():
        return kernel
    return triton.autotune([triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                            for bm, bn, bk, w, s in configs], key=key)(kernel)


def column_layout(H: int, G: int, D: int, Rq: int, Rkv: int) -> list[int]:
    """Widths of a_q | b_q | a_k | b_k | a_v | b_v in `proj` (the fast body's concatenation order)."""
    return [H * Rq, Rq * D, G * Rkv, Rkv * D, G * Rkv, Rkv * D]


# ----------------------------------------------------------------------------------------------
# reference


def tpa_prologue_reference(proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T: int, eps: float,
                           dims: list[int]):
    """Plain torch, the model's own TPA product and rotation: proj [N, 1064], biases [heads * D],
    norm weights [D], cos/sin [N, D/2] -> q [B, H, T, D] and k [B, G, T, D] in proj's dtype,
    v [B, G, T, D] in fp32 (fp64 for fp64)."""
    H, G, D, Rq, Rkv = dims
    acc = torch.float64 if proj.dtype == torch.float64 else torch.float32
    N = proj.shape[0]
    aq, bq, ak, bk, av, bv = proj.to(acc).split(column_layout(H, G, D, Rq, Rkv), dim=-1)

    def tpa(a, b, heads, R, bias):
        return tpa_product(a.view(N, heads, R), b.view(N, R, D)) + bias.to(acc).view(heads, D)

    def norm_rotate(x, w):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(acc)
        return rotate(x, cos.to(acc)[:, None, :], sin.to(acc)[:, None, :])

    def heads_first(x, heads, dtype):
        return x.view(N // T, T, heads, D).transpose(1, 2).contiguous().to(dtype)

    q = norm_rotate(tpa(aq, bq, H, Rq, q_bias), q_w)
    k = norm_rotate(tpa(ak, bk, G, Rkv, k_bias), k_w)
    v = tpa(av, bv, G, Rkv, v_bias)
    return heads_first(q, H, proj.dtype), heads_first(k, G, proj.dtype), heads_first(v, G, acc)


# ----------------------------------------------------------------------------------------------
# kernels

if triton is not None:
    # Tiles are 2-D [BN tokens, D/2] (the rotation pairs column d with d + D/2, so q and k are kept
    # as two halves); the rank axis of the TPA product is unrolled into up to four slots of such
    # tiles (r0..r3, unused slots compiled out). The first version held [BN, R, D/2] tiles: ptxas
    # reported 191-255 registers per thread for every configuration (spilling from 4 tokens x 2
    # warps up), so at most a few warps per SM were resident.

    @triton.jit
    def _half_tiles(ptr, rows, row_ok, stride, col, HALF: tl.constexpr):
        """Columns [col, col + D) of each token row as two [BN, HALF] fp32 tiles."""
        p = ptr + rows[:, None] * stride + col + tl.arange(0, HALF)[None, :]
        lo = tl.load(p, mask=row_ok[:, None], other=0.0).to(tl.float32)
        hi = tl.load(p + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32)
        return lo, hi

    @triton.jit
    def _load_b(proj_ptr, rows, row_ok, stride_n, B_COL: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
        """The token block's shared factors b_r (r < R) as half tiles; slots r >= R are never read."""
        HALF: tl.constexpr = D // 2
        b0l, b0h = _half_tiles(proj_ptr, rows, row_ok, stride_n, B_COL, HALF)
        b1l, b1h, b2l, b2h, b3l, b3h = b0l, b0h, b0l, b0h, b0l, b0h
        if R > 1:
            b1l, b1h = _half_tiles(proj_ptr, rows, row_ok, stride_n, B_COL + D, HALF)
        if R > 2:
            b2l, b2h = _half_tiles(proj_ptr, rows, row_ok, stride_n, B_COL + 2 * D, HALF)
        if R > 3:
            b3l, b3h = _half_tiles(proj_ptr, rows, row_ok, stride_n, B_COL + 3 * D, HALF)
        return b0l, b0h, b1l, b1h, b2l, b2h, b3l, b3h

    @triton.jit
    def _pre(proj_ptr, rows, row_ok, stride_n, bias_ptr, h, b0l, b0h, b1l, b1h, b2l, b2h, b3l, b3h,
             A_COL: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
        """One head's a_r [BN] and pre-norm x = sum_r a_r b_r / R + bias as halves [BN, D/2]."""
        HALF: tl.constexpr = D // 2
        a_ptr = proj_ptr + rows * stride_n + A_COL + h * R
        a0 = tl.load(a_ptr, mask=row_ok, other=0.0).to(tl.float32)
        x1, x2 = a0[:, None] * b0l, a0[:, None] * b0h
        a1, a2, a3 = a0, a0, a0
        if R > 1:
            a1 = tl.load(a_ptr + 1, mask=row_ok, other=0.0).to(tl.float32)
            x1, x2 = x1 + a1[:, None] * b1l, x2 + a1[:, None] * b1h
        if R > 2:
            a2 = tl.load(a_ptr + 2, mask=row_ok, other=0.0).to(tl.float32)
            x1, x2 = x1 + a2[:, None] * b2l, x2 + a2[:, None] * b2h
        if R > 3:
            a3 = tl.load(a_ptr + 3, mask=row_ok, other=0.0).to(tl.float32)
            x1, x2 = x1 + a3[:, None] * b3l, x2 + a3[:, None] * b3h
        d = tl.arange(0, HALF)
        x1 = x1 / R + tl.load(bias_ptr + h * D + d)[None, :].to(tl.float32)
        x2 = x2 / R + tl.load(bias_ptr + h * D + HALF + d)[None, :].to(tl.float32)
        return a0, a1, a2, a3, x1, x2

    @triton.jit
    def _forward_group(proj_ptr, rows, row_ok, stride_n, bias_ptr, w_ptr, cos, sin, out_ptr, out_row, out_sh,
                       eps, A_COL: tl.constexpr, B_COL: tl.constexpr, HEADS: tl.constexpr, R: tl.constexpr,
                       D: tl.constexpr, NORM: tl.constexpr):
        HALF: tl.constexpr = D // 2
        b0l, b0h, b1l, b1h, b2l, b2h, b3l, b3h = _load_b(proj_ptr, rows, row_ok, stride_n, B_COL, R, D)
        d = tl.arange(0, HALF)
        for h in range(HEADS):  # a loop, not unrolled: one head's tiles live at a time
            _, _, _, _, x1, x2 = _pre(proj_ptr, rows, row_ok, stride_n, bias_ptr, h, b0l, b0h, b1l, b1h, b2l,
                                      b2h, b3l, b3h, A_COL, R, D)
            if NORM:
                rs = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
                n1 = x1 * rs * tl.load(w_ptr + d)[None, :].to(tl.float32)
                n2 = x2 * rs * tl.load(w_ptr + HALF + d)[None, :].to(tl.float32)
                x1 = n1 * cos - n2 * sin
                x2 = n2 * cos + n1 * sin
            ptr = out_ptr + out_row[:, None] + h * out_sh + d[None, :]
            tl.store(ptr, x1.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(ptr + HALF, x2.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _token_block(blk, cos_ptr, sin_ptr, N, BN: tl.constexpr, D: tl.constexpr):
        """Token rows of block `blk`, their validity, and their cos/sin [BN, D/2] in fp32."""
        HALF: tl.constexpr = D // 2
        rows = blk * BN + tl.arange(0, BN)
        row_ok = rows < N
        cs_ptr = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_ptr + cs_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + cs_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
        return rows, row_ok, cs_ptr, cos, sin

    @triton.jit
    def _forward_kernel(proj_ptr, qb_ptr, kb_ptr, vb_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                        N, T, stride_n, eps, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                        RQ: tl.constexpr, RKV: tl.constexpr, c_bq: tl.constexpr, c_ak: tl.constexpr,
                        c_bk: tl.constexpr, c_av: tl.constexpr, c_bv: tl.constexpr, BN: tl.constexpr):
        rows, row_ok, cs_ptr, cos, sin = _token_block(tl.program_id(0), cos_ptr, sin_ptr, N, BN, D)
        batch, t = rows // T, rows % T
        _forward_group(proj_ptr, rows, row_ok, stride_n, qb_ptr, qw_ptr, cos, sin, q_ptr,
                       (batch * H * T + t) * D, T * D, eps, 0, c_bq, H, RQ, D, True)
        _forward_group(proj_ptr, rows, row_ok, stride_n, kb_ptr, kw_ptr, cos, sin, k_ptr,
                       (batch * G * T + t) * D, T * D, eps, c_ak, c_bk, G, RKV, D, True)
        _forward_group(proj_ptr, rows, row_ok, stride_n, vb_ptr, kw_ptr, cos, sin, v_ptr,
                       (batch * G * T + t) * D, T * D, eps, c_av, c_bv, G, RKV, D, False)

    @triton.jit
    def _grad_b_slot(gproj_ptr, rows, row_ok, stride_g, col, lo, hi, HALF: tl.constexpr):
        p = gproj_ptr + rows[:, None] * stride_g + col + tl.arange(0, HALF)[None, :]
        tl.store(p, lo.to(gproj_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(p + HALF, hi.to(gproj_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _rank_slot_grads(ga_ptr, row_ok, e1, e2, bl, bh, a, gl, gh, R: tl.constexpr):
        """One rank slot r of one head: stores d loss / d a_r [BN] (at ga_ptr, one column of the
        proj gradient) and returns the b_r gradient halves with this head's share added."""
        tl.store(ga_ptr, ((tl.sum(e1 * bl, axis=1) + tl.sum(e2 * bh, axis=1)) / R).to(ga_ptr.dtype.element_ty),
                 mask=row_ok)
        return gl + e1 * (a / R)[:, None], gh + e2 * (a / R)[:, None]

    @triton.jit
    def _backward_group(proj_ptr, gproj_ptr, rows, row_ok, stride_n, stride_g, bias_ptr, w_ptr, cos, sin, go_ptr,
                        go_row, go_sh, part, BIAS_OFF: tl.constexpr, eps, A_COL: tl.constexpr,
                        B_COL: tl.constexpr, HEADS: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                        NORM: tl.constexpr):
        """Gradients of one group for one token block: writes its proj columns, adds the bias
        gradients into this program's partial-sum row; returns its cos/sin gradient contributions
        and its norm-weight gradient [D/2] halves."""
        HALF: tl.constexpr = D // 2
        b0l, b0h, b1l, b1h, b2l, b2h, b3l, b3h = _load_b(proj_ptr, rows, row_ok, stride_n, B_COL, R, D)
        g0l, g0h = tl.zeros_like(b0l), tl.zeros_like(b0l)  # gradients of b_r, summed over heads
        g1l, g1h, g2l, g2h, g3l, g3h = g0l, g0h, g0l, g0h, g0l, g0h
        d = tl.arange(0, HALF)
        gcos, gsin = tl.zeros_like(cos), tl.zeros_like(cos)
        gw1 = tl.zeros([HALF], dtype=tl.float32)
        gw2 = tl.zeros([HALF], dtype=tl.float32)
        w1 = tl.load(w_ptr + d)[None, :].to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d)[None, :].to(tl.float32)
        for h in range(HEADS):  # a loop, not unrolled: one head's tiles live at a time
            a0, a1, a2, a3, x1, x2 = _pre(proj_ptr, rows, row_ok, stride_n, bias_ptr, h, b0l, b0h, b1l, b1h,
                                          b2l, b2h, b3l, b3h, A_COL, R, D)
            ptr = go_ptr + go_row[:, None] + h * go_sh + d[None, :]
            e1 = tl.load(ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)  # d loss / d output
            e2 = tl.load(ptr + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32)
            if NORM:
                rs = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
                n1, n2 = x1 * rs * w1, x2 * rs * w2
                gcos += e1 * n1 + e2 * n2
                gsin += e2 * n1 - e1 * n2
                gn1 = e1 * cos + e2 * sin  # rotation transposed
                gn2 = e2 * cos - e1 * sin
                gw1 += tl.sum(gn1 * x1 * rs, axis=0)
                gw2 += tl.sum(gn2 * x2 * rs, axis=0)
                wg1, wg2 = gn1 * w1, gn2 * w2
                dot = ((tl.sum(wg1 * x1, axis=1) + tl.sum(wg2 * x2, axis=1)) / D)[:, None]
                e1 = rs * wg1 - x1 * rs * rs * rs * dot
                e2 = rs * wg2 - x2 * rs * rs * rs * dot
            # e = d loss / d x: the bias gradient (this program's running sums), then the factors'
            bp = part + BIAS_OFF + h * D + d
            tl.store(bp, tl.load(bp) + tl.sum(e1, axis=0))
            tl.store(bp + HALF, tl.load(bp + HALF) + tl.sum(e2, axis=0))
            a_ptr = gproj_ptr + rows * stride_g + A_COL + h * R
            g0l, g0h = _rank_slot_grads(a_ptr, row_ok, e1, e2, b0l, b0h, a0, g0l, g0h, R)
            if R > 1:
                g1l, g1h = _rank_slot_grads(a_ptr + 1, row_ok, e1, e2, b1l, b1h, a1, g1l, g1h, R)
            if R > 2:
                g2l, g2h = _rank_slot_grads(a_ptr + 2, row_ok, e1, e2, b2l, b2h, a2, g2l, g2h, R)
            if R > 3:
                g3l, g3h = _rank_slot_grads(a_ptr + 3, row_ok, e1, e2, b3l, b3h, a3, g3l, g3h, R)
        _grad_b_slot(gproj_ptr, rows, row_ok, stride_g, B_COL, g0l, g0h, HALF)
        if R > 1:
            _grad_b_slot(gproj_ptr, rows, row_ok, stride_g, B_COL + D, g1l, g1h, HALF)
        if R > 2:
            _grad_b_slot(gproj_ptr, rows, row_ok, stride_g, B_COL + 2 * D, g2l, g2h, HALF)
        if R > 3:
            _grad_b_slot(gproj_ptr, rows, row_ok, stride_g, B_COL + 3 * D, g3l, g3h, HALF)
        return gcos, gsin, gw1, gw2

    @triton.jit
    def _backward_kernel(proj_ptr, qb_ptr, kb_ptr, vb_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, gq_ptr, gk_ptr, gv_ptr,
                         gproj_ptr, gcos_ptr, gsin_ptr, part_ptr, N, T, stride_n, stride_g, eps,
                         gq_sb, gq_sh, gq_st, gk_sb, gk_sh, gk_st, gv_sb, gv_sh, gv_st,
                         H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, RQ: tl.constexpr, RKV: tl.constexpr,
                         c_bq: tl.constexpr, c_ak: tl.constexpr, c_bk: tl.constexpr, c_av: tl.constexpr,
                         c_bv: tl.constexpr, PART: tl.constexpr, BN: tl.constexpr, BLOCKS: tl.constexpr):
        """BLOCKS consecutive blocks of BN tokens per program: the bias and norm-weight gradients
        are summed over them before they reach the [programs, PART] partial-sum buffer."""
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)  # int32 offsets (half the registers of int64): _check bounds the sizes
        part = part_ptr + pid * PART  # q bias | k bias | v bias | q weight | k weight
        o_kb: tl.constexpr = H * D
        o_vb: tl.constexpr = o_kb + G * D
        o_qw: tl.constexpr = o_vb + G * D
        o_kw: tl.constexpr = o_qw + D
        gwq1 = tl.zeros([HALF], dtype=tl.float32)
        gwq2, gwk1, gwk2 = gwq1, gwq1, gwq1
        for i in range(BLOCKS):
            rows, row_ok, cs_ptr, cos, sin = _token_block(pid * BLOCKS + i, cos_ptr, sin_ptr, N, BN, D)
            batch, t = rows // T, rows % T
            gc_q, gs_q, w1, w2 = _backward_group(proj_ptr, gproj_ptr, rows, row_ok, stride_n, stride_g, qb_ptr,
                                                 qw_ptr, cos, sin, gq_ptr, batch * gq_sb + t * gq_st, gq_sh, part, 0,
                                                 eps, 0, c_bq, H, RQ, D, True)
            gwq1, gwq2 = gwq1 + w1, gwq2 + w2
            gc_k, gs_k, w1, w2 = _backward_group(proj_ptr, gproj_ptr, rows, row_ok, stride_n, stride_g, kb_ptr,
                                                 kw_ptr, cos, sin, gk_ptr, batch * gk_sb + t * gk_st, gk_sh, part,
                                                 o_kb, eps, c_ak, c_bk, G, RKV, D, True)
            gwk1, gwk2 = gwk1 + w1, gwk2 + w2
            _backward_group(proj_ptr, gproj_ptr, rows, row_ok, stride_n, stride_g, vb_ptr, kw_ptr, cos, sin, gv_ptr,
                            batch * gv_sb + t * gv_st, gv_sh, part, o_vb, eps, c_av, c_bv, G, RKV, D, False)
            tl.store(gcos_ptr + cs_ptr, gc_q + gc_k, mask=row_ok[:, None])
            tl.store(gsin_ptr + cs_ptr, gs_q + gs_k, mask=row_ok[:, None])
            tl.debug_barrier()  # the next block reads the partial sums this one wrote
        d = tl.arange(0, HALF)
        tl.store(part + o_qw + d, gwq1)
        tl.store(part + o_qw + HALF + d, gwq2)
        tl.store(part + o_kw + d, gwk1)
        tl.store(part + o_kw + HALF + d, gwk2)


_kernels: dict = {}


def _tuned(which: str):
    """The kernel, autotuned over its (BN, warps) configs per token count on CUDA; the interpreter
    (no driver to time with) runs it as is with `_untuned_config`."""
    if which not in _kernels:
        kernel = _forward_kernel if which == "forward" else _backward_kernel
        if not interpreting():
            if which == "forward":
                configs = [triton.Config({"BN": bn}, num_warps=w) for bn, w in FORWARD_CONFIGS]
            else:
                configs = [triton.Config({"BN": bn, "BLOCKS": blocks}, num_warps=w)
                           for bn, blocks, w in BACKWARD_CONFIGS + SHORT_BACKWARD_CONFIGS]
            backward = which == "backward"
            kernel = triton.autotune(configs, key=["N", "T"], reset_to_zero=["part_ptr"] if backward else None,
                                     prune_configs_by={"early_config_prune": _prune_backward} if backward else None,
                                     )(kernel)
        _kernels[which] = kernel
    return _kernels[which]


def _column_starts(dims: list[int]) -> dict:
    """Where b_q, a_k, b_k, a_v, b_v start in proj's row (a_q starts at 0)."""
    starts, at = {}, 0
    for name, width in zip(("c_bq", "c_ak", "c_bk", "c_av", "c_bv"), column_layout(*dims)):
        at += width
        starts[name] = at
    return starts


def _untuned_config(which: str) -> dict:
    """The interpreter's config: few tokens per block and program, so tests cross block and program
    boundaries (the partial-sum buffer is sized for this config there)."""
    if not interpreting():
        return {}
    return {"BN": 2, "BLOCKS": 2} if which == "backward" else {"BN": 4}


def local_qkv(proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T: int, eps: float, dims: list[int]):
    """The entry point: the Triton op where it runs (CUDA, or the interpreter), else the reference."""
    if available(proj.device) and supported(dims):
        return tpa_prologue(proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T, eps, dims)
    return tpa_prologue_reference(proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T, eps, dims)


def supported(dims: list[int]) -> bool:
    """Power-of-two head_dim (>= 32: a tl.arange extent) and TPA ranks 1..4 (the kernels' slots)."""
    D, Rq, Rkv = dims[2:]
    return D >= 32 and D & (D - 1) == 0 and all(1 <= r <= MAX_RANK for r in (Rq, Rkv))


def _check(proj: torch.Tensor, T: int, dims: list[int]) -> None:
    if triton is None:
        raise RuntimeError("tpa_prologue: Triton is not installed (call local_qkv, which falls back)")
    H, G, D, Rq, Rkv = dims
    if not supported(dims):
        raise ValueError(f"tpa_prologue: the Triton kernels need a power-of-two head_dim (>= 32) and TPA ranks "
                         f"1..{MAX_RANK}; got head_dim={D}, ranks {Rq}/{Rkv} (use the torch prologue)")
    if proj.shape[0] * max(proj.stride(0), (H + 2 * G) * D) >= 2**31:  # the kernels' offsets are int32
        raise ValueError(f"tpa_prologue: {proj.shape[0]} tokens is too many for one call (int32 offsets); "
                         f"split the batch")
    if proj.shape[-1] != sum(column_layout(*dims)) or proj.shape[0] % T:
        raise ValueError(f"tpa_prologue: proj {tuple(proj.shape)} (stride {proj.stride()}) does not match "
                         f"{dims} with T={T}")


def _unit_columns(proj: torch.Tensor) -> torch.Tensor:
    """proj with unit column stride (the kernels index columns densely, rows by their stride)."""
    return proj if proj.stride(-1) == 1 else proj.contiguous()


def _outputs(proj: torch.Tensor, T: int, dims: list[int]):
    H, G, D = dims[:3]
    B = proj.shape[0] // T
    return (proj.new_empty(B, H, T, D), proj.new_empty(B, G, T, D),
            proj.new_empty(B, G, T, D, dtype=torch.float64 if proj.dtype == torch.float64 else torch.float32))


@torch.library.custom_op("vpmoe::tpa_prologue", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def tpa_prologue(proj: torch.Tensor, q_bias: torch.Tensor, k_bias: torch.Tensor, v_bias: torch.Tensor,
                 q_w: torch.Tensor, k_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int, eps: float,
                 dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k [B, G, T, D] (proj's dtype) and v [B, G, T, D] (fp32) from the local layer's
    projection; see the module docstring. Same function as `tpa_prologue_reference`."""
    _check(proj, T, dims)
    proj = _unit_columns(proj)
    H, G, D, Rq, Rkv = dims
    q, k, v = _outputs(proj, T, dims)
    N = proj.shape[0]
    cos, sin = cos.contiguous(), sin.contiguous()
    _tuned("forward")[lambda meta: (triton.cdiv(N, meta["BN"]),)](
        proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, q, k, v, N, T, proj.stride(0), eps,
        H=H, G=G, D=D, RQ=Rq, RKV=Rkv, **_column_starts(dims), **_untuned_config("forward"))
    return q, k, v


@tpa_prologue.register_fake
def _(proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T, eps, dims):
    return _outputs(proj, T, dims)


@torch.library.custom_op("vpmoe::tpa_prologue_backward", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def tpa_prologue_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, proj: torch.Tensor,
                          q_bias: torch.Tensor, k_bias: torch.Tensor, v_bias: torch.Tensor, q_w: torch.Tensor,
                          k_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int, eps: float,
                          dims: list[int]) -> list[torch.Tensor]:
    """Gradients of `tpa_prologue` for (proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin)."""
    _check(proj, T, dims)
    proj = _unit_columns(proj)
    H, G, D, Rq, Rkv = dims
    N = proj.shape[0]
    # room for the most programs any tried config launches; rows past the chosen config's stay zero
    untuned = _untuned_config("backward")
    programs = triton.cdiv(N, untuned["BN"] * untuned["BLOCKS"]) if untuned else partial_rows(N)
    part_width = (H + 2 * G) * D + 2 * D
    part = proj.new_zeros(programs, part_width, dtype=torch.float32)
    gproj = proj.new_empty(proj.shape)  # contiguous, whatever proj's row stride
    cos, sin = cos.contiguous(), sin.contiguous()
    gcos, gsin = torch.empty_like(cos, dtype=torch.float32), torch.empty_like(sin, dtype=torch.float32)
    gq, gk, gv = (g if g.stride(-1) == 1 else g.contiguous() for g in (gq, gk, gv))
    _tuned("backward")[lambda meta: (triton.cdiv(N, meta["BN"] * meta["BLOCKS"]),)](
        proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, gq, gk, gv, gproj, gcos, gsin, part, N, T,
        proj.stride(0), gproj.stride(0), eps, *gq.stride()[:3], *gk.stride()[:3], *gv.stride()[:3],
        H=H, G=G, D=D, RQ=Rq, RKV=Rkv, PART=part_width, **_column_starts(dims), **_untuned_config("backward"))
    sums = part.sum(0).split([H * D, G * D, G * D, D, D])  # views of one tensor: returned as copies
    small = [g.to(x.dtype, copy=True) for g, x in zip(sums, (q_bias, k_bias, v_bias, q_w, k_w))]
    return [gproj, *small, gcos.to(cos.dtype), gsin.to(sin.dtype)]


@tpa_prologue_backward.register_fake
def _(gq, gk, gv, proj, q_bias, k_bias, v_bias, q_w, k_w, cos, sin, T, eps, dims):
    return [proj.new_empty(proj.shape)] + [torch.empty_like(t) for t in (q_bias, k_bias, v_bias, q_w, k_w, cos, sin)]


def _setup_context(ctx, inputs, output):
    *tensors, T, eps, dims = inputs
    ctx.save_for_backward(*tensors)
    ctx.T, ctx.eps, ctx.dims = T, eps, dims


def _backward(ctx, gq, gk, gv):
    proj = ctx.saved_tensors[0]
    H, G, D = ctx.dims[:3]
    B = proj.shape[0] // ctx.T
    # an output that did not reach the loss has no gradient: zeros (kept in the output's dtype)
    gq, gk, gv = (g if g is not None else torch.zeros(B, n, ctx.T, D, device=proj.device, dtype=dt)
                  for g, n, dt in ((gq, H, proj.dtype), (gk, G, proj.dtype), (gv, G, torch.float32)))
    grads = tpa_prologue_backward(gq, gk, gv, *ctx.saved_tensors, ctx.T, ctx.eps, ctx.dims)
    return (*grads, None, None, None)


tpa_prologue.register_autograd(_backward, setup_context=_setup_context)

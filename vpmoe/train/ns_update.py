"""Muon's update applied in the epilogue of Newton-Schulz's last product: the streaming experts'
update (`expert_muon.muon_step`, the default on CUDA) and, opt-in, the packed path's
(`FastMuonAdamW(fuse_update=True)`: -0.2 ms at (a) on an H200, 2026-12-03).

The Gram-side Newton-Schulz (`optim_fast.gram_newton_schulz_packed`) ends with one product per
expert tensor, O = Q X (Q the [m, m] polynomial in the Gram matrix, X the [m, n] bf16 update; at
vpMoE's experts m = 128, n = 1024), written to memory as bf16 and read back by the update
W <- W * decay + step * O. This kernel computes each [m, BN] tile of Q X in registers (K = m: one
dot), rounds it to bf16 as the two-kernel path does, and updates W's tile in place: O is never
written or read, 4 of the ~36 bytes per expert parameter the optimizer moves per step
(docs/performance.md, What remains 6). The streaming path passes Q as two bf16 parts (`q_lo`:
a near-fp32 Q, both dots summed in one fp32 accumulator) or in fp16 (rounded to bf16 as it loads).

Design choices:
- One program per (matrix, TILES x BN columns); Q's tile is loaded whole (m <= 128, vpMoE's expert
  width: a 256 x 256 tile would not fit on chip with its operand), so there is no K loop. The
  default is one program per 128 x 1024 matrix (Q loaded once): the loop over its column tiles is
  pipelined by Triton for both x and W (`tl.range` at the launch's stages; W is read from shared
  memory straight into the products' layout: two layout conversions a tile, both of outputs, where
  a hand prefetch of W to registers had three; -0.46 ms at (a), H100, 2026-12-06). Where a matrix has
  several programs they are adjacent in launch order (grid axis 0), so they run side by side on
  its rows and share Q in L2.
- Weights stored transposed (the up projection's [E, 1024, 128], orthogonalised as its
  [128, 1024] transpose) use the same kernel with W's strides swapped.
- decay and step are 0-dim device tensors, read in the kernel: a captured graph follows the
  learning-rate schedule.
- `qx_update` is a `torch.library.custom_op` mutating W (capturable in CUDA graphs: fixed grid for
  fixed shapes). `qx_update_reference` is the two-op path it replaces; tests/test_ns_update.py runs
  the kernel under the Triton interpreter against it and float64.
"""
from __future__ import annotations

import torch

from vpmoe.model.router_fused import _f32_dot  # the interpreter's bf16 dot workaround, shared
from vpmoe.model.tpa_fused import available, interpreting  # noqa: F401 - the same test for every Triton op
from vpmoe.train.ns_gram import bmm_f32

try:
    import triton
    import triton.language as tl

    from vpmoe.model.router_fused import _round_bf16
except ImportError:  # CPU-only installs: FastMuonAdamW keeps the two-kernel update
    triton = None

MAX_M = 128  # the short side the kernel takes (Q's tile is held whole)
# (columns per tile, tiles per program, warps, pipeline stages): one program per 128 x 1024 matrix, Q loaded once, x
# and W streamed by the pipeliner (since 2026-12-06 20:00: the 20-layer optimizer step 24.04 -> 23.92 / 23.88
# ms, 24.55 at 2 stages; (a) 56.14 -> 55.68 ms; H100). Before that, with W loaded one tile ahead by hand:
# 138 -> 112 us a launch in the 20-layer optimizer step against one tile per program (H200, 2026-12-06
# 03:11; at 16 warps 131 us). Before W's
# prefetch, 2 or 4 tiles a program (and 128-column tiles) timed slower on an H100 (2026-12-05 21:38);
# W's tile loaded before the products with one tile a program, or U and W with evict_first (so L2
# keeps Q), made no difference (H100, 2026-12-06 00:27); nor, in the 20-layer optimizer step, did two
# programs per matrix (23.77 against 23.61 ms), 4 stages (23.92; H100, 2026-12-06 05:46) or W's
# tile loaded two tiles ahead (a trial, removed: 24.34 against 23.95, also at 4 stages; 06:16). With a
# matrix's programs adjacent in launch order, one tile a program is the fastest launch alone (165.7 /
# 177.7 us up / down against 173.4 / 185.1) but not in the step, where three streams share the GPU
# (24.60 against 23.87 ms; H100, 2026-12-06 07:25-07:28)
UPDATE_CONFIG = (64, 16, 8, 3)
DEFAULT_UPDATE_CONFIG = UPDATE_CONFIG  # for benchmarks that set others per run


def qx_update_reference(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, decay: torch.Tensor,
                        step: torch.Tensor, transposed: bool, q_lo: torch.Tensor | None = None) -> None:
    """The path the kernel replaces: O = bf16(Q X) ([b, m, n]), then W <- W * decay + step * O, with
    W [b, m, n] (or [b, n, m] when `transposed`); with `q_lo`, O = bf16(Q X + Q_lo X) (fp32 sums)."""
    if q_lo is None:
        o = torch.bmm(q.to(x.dtype), x)
    else:
        o = (bmm_f32(q.to(x.dtype), x) + bmm_f32(q_lo, x)).to(x.dtype)
    w.mul_(decay).add_((o.mT if transposed else o).to(w.dtype) * step)


if triton is not None:
    @triton.jit
    def _qx_update_kernel(q_ptr, q_lo_ptr, x_ptr, w_ptr, low_ptr, decay_ptr, step_ptr, M, N,
                          sq_b, sq_m, sq_k, sx_b, sx_k, sx_n, sw_b, sw_m, sw_n, sl_b, sl_m, sl_n,
                          HAS_LOW: tl.constexpr, HAS_LO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          TILES: tl.constexpr, F32_DOT: tl.constexpr, Q_FP16: tl.constexpr, STAGES: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        rows = tl.arange(0, BM)
        row_ok = rows < M
        q_tile = b * sq_b + rows[:, None] * sq_m + rows[None, :] * sq_k
        ok_q = row_ok[:, None] & row_ok[None, :]
        # a bf16 Q goes to the products as loaded (no fp32 copy in registers); an fp16 one is rounded
        # to bf16 as torch's .to() rounds
        q = tl.load(q_ptr + q_tile, mask=ok_q, other=0.0)
        if Q_FP16:
            q = _round_bf16(q.to(tl.float32)).to(tl.bfloat16)
        if F32_DOT:
            q = q.to(tl.float32)
        if HAS_LO:  # bf16
            q_lo = tl.load(q_lo_ptr + q_tile, mask=ok_q, other=0.0)
            if F32_DOT:
                q_lo = q_lo.to(tl.float32)
        decay = tl.load(decay_ptr)
        step = tl.load(step_ptr)
        first = tl.program_id(0) * TILES * BN
        # the loop is pipelined at the launch's stages for both loads (x, the dots' operand, and W, used
        # only pointwise): both stream through shared memory ahead of their tile, and W is read from
        # there straight into the products' register layout (W loaded to registers by hand one tile
        # ahead cost a third conversion a tile: Triton moved it through shared memory anyway)
        for t in tl.range(TILES, num_stages=STAGES):  # Q loaded once for TILES column tiles
            cols = first + t * BN + tl.arange(0, BN)
            tile_ok = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_k + cols[None, :] * sx_n, mask=tile_ok, other=0.0)
            w_tile = w_ptr + b * sw_b + rows[:, None] * sw_m + cols[None, :] * sw_n
            w = tl.load(w_tile, mask=tile_ok, other=0.0)
            acc = tl.dot(q, x.to(tl.float32) if F32_DOT else x)
            if HAS_LO:  # Q's low part (a near-fp32 Q as two bf16 operands), in the same fp32 sums
                acc = tl.dot(q_lo, x.to(tl.float32) if F32_DOT else x, acc)
            o = _round_bf16(acc)  # the bf16 product the two-kernel path writes
            w = w * decay + o * step
            tl.store(w_tile, w, mask=tile_ok)
            if HAS_LOW:  # the kept bf16 copy, from the stored fp32 value (rounded as torch's copy_ rounds)
                tl.store(low_ptr + b * sl_b + rows[:, None] * sl_m + cols[None, :] * sl_n,
                         _round_bf16(w).to(tl.bfloat16), mask=tile_ok)


def applies(device: torch.device, ns_dtype: torch.dtype, w_dtype: torch.dtype, m: int) -> bool:
    """Whether the kernel serves a step on `device` with Newton-Schulz in `ns_dtype`, fp32 weights
    and matrices of short side m (else the two-kernel path)."""
    return (triton is not None and available(device) and ns_dtype == torch.bfloat16
            and w_dtype == torch.float32 and m <= MAX_M)


@torch.library.custom_op("vpmoe::qx_update", mutates_args=("w", "low"))
def qx_update(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, decay: torch.Tensor, step: torch.Tensor,
              transposed: bool, low: torch.Tensor | None, q_lo: torch.Tensor | None = None) -> None:
    """W <- W * decay + step * bf16(Q X) in place: q [b, m, m] (bf16, or fp16 rounded to bf16 in
    the kernel), x [b, m, n] bf16, w fp32 [b, m, n] (or [b, n, m] when `transposed`); `q_lo` (bf16,
    q's shape and strides) Q's low part: O = bf16(Q X + Q_lo X), one fp32 sum (the streaming experts'
    near-fp32 Q, `expert_muon.gram_chain`); decay and step 0-dim fp32 device tensors; `low`
    (bf16, w's shape) gets the updated W rounded, in the same pass (the kept weight copy). `low`
    has no default: torch 2.11 drops a trailing optional argument left at its default and then
    fails to find the mutated one (IndexError in the op's version bump; 2.13 does not)."""
    bsz, m, n = x.shape
    want = (bsz, n, m) if transposed else (bsz, m, n)
    if (not applies(w.device, x.dtype, w.dtype, m) or q.dtype not in (x.dtype, torch.float16) or tuple(w.shape) != want
            or tuple(q.shape) != (bsz, m, m)
            or (low is not None and (low.shape != w.shape or low.dtype != torch.bfloat16))
            or (q_lo is not None and (q_lo.shape != q.shape or q_lo.stride() != q.stride()
                                      or q_lo.dtype != torch.bfloat16))):
        got_low = "" if low is None else f", low {tuple(low.shape)} {low.dtype}"
        raise ValueError(f"qx_update: wants bf16 or fp16 q [b, m, m] (m <= {MAX_M}), bf16 x [b, m, n], fp32 w {want}, "
                         f"low None or bf16 of w's shape, q_lo None or bf16 of q's shape and strides; got q "
                         f"{tuple(q.shape)} {q.dtype}, x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}{got_low}")
    sw_b, sw_1, sw_2 = w.stride()
    sw_m, sw_n = (sw_2, sw_1) if transposed else (sw_1, sw_2)
    sl_b, sl_1, sl_2 = (0, 0, 0) if low is None else low.stride()
    sl_m, sl_n = (sl_2, sl_1) if transposed else (sl_1, sl_2)
    bm = max(16, triton.next_power_of_2(m))
    bn, tiles, warps, stages = UPDATE_CONFIG
    bn = 16 if interpreting() else bn
    _qx_update_kernel[(triton.cdiv(n, bn * tiles), bsz)](
        q, q if q_lo is None else q_lo, x, w, w if low is None else low, decay, step, m, n, *q.stride(), *x.stride(),
        sw_b, sw_m, sw_n, sl_b, sl_m, sl_n, HAS_LOW=low is not None, HAS_LO=q_lo is not None, BM=bm, BN=bn,
        TILES=tiles, F32_DOT=_f32_dot(), Q_FP16=q.dtype == torch.float16, STAGES=stages, num_warps=warps,
        num_stages=stages)


@qx_update.register_fake
def _(w, q, x, decay, step, transposed, low, q_lo=None):
    return None

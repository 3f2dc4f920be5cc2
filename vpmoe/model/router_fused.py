"""The router's near-fp32 logits x @ w^T as one Triton GEMM that splits x (and w) into bf16 pairs in
registers (bf16x3: x = xh + xl, w = wh + wl; x @ w ~ xh@wh + xh@wl + xl@wh, ~2^-16 relative).

In torch, bf16x3 is a split kernel that writes [N, 3d] bf16 (xh | xh | xl, the concatenated K)
and then one GEMM over K = 3d that reads it back: at 65k tokens 1.1 GB of traffic per call,
measured 250 us (split) + 210 us (GEMM) per MoE layer in the 80-layer step (H200, 2026-12-02),
~3.4% of the step with recomputation (estimate from the profile). Here each program loads its
fp32 x tile once, splits it in registers and runs the three bf16 MMAs into one fp32 accumulator:
x is read once (4 B per value) and only the [N, E] logits are written. Measured so far only
together with the router's bf16 gradients: the router component at 20 layers x 16k tokens
7.5 -> 4.6 ms (docs/performance.md); the kernel's own time in the step is not profiled yet.

Design choices:
- Forward only. The gradients are single bf16 GEMMs (`kernels._RouterLogits`), which cuBLAS runs
  well; only the forward's precision needed the split.
- w is split per tile too (since 2026-12-07; before, torch split it into two [d, E] bf16 tensors
  each call: a kernel of its own, and a cast of w for backward beside it): the kernel reads the
  fp32 master [E, d] as it is (4 B per value, the two halves' bytes). All loads are masked, so any
  N, d and E work (tests cross every tile edge).
- `router_logits_fused` is a `torch.library.custom_op`: opaque to torch.compile, capturable in CUDA
  graphs (fixed grid for fixed shapes), autotuned per (d, E, power-of-two bucket of the token count)
  at a bucket's first call, on that call's own tensors (no buffers of the tuner's; a training step's
  shapes run eagerly before any CUDA graph is captured). Tuning once per (d, E) at 16k rows before
  the step (`pretune`, removed 2026-12-04) gave small batches tiles with too few programs.
- `kernels.mm_bf16x3` is the same function in torch (the CPU's path and the tests' reference);
  tests/test_router_fused.py runs this kernel under the Triton interpreter against it and float64.
"""
from __future__ import annotations

import torch

# the same test for every Triton op (`available` is asked as RF.available by kernels.router_logits)
from vpmoe.model.tpa_fused import autotuned, available, interpreting  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use kernels.mm_bf16x3
    triton = None

# (rows, experts, K step) per tile, warps, pipeline stages; tuned per (d, E, power-of-two bucket of the
# token count). The small tiles are for small batches: tuned per (d, E) alone at 16k rows, (a)'s 4k
# tokens launched 32-64 programs on 132 SMs and the kernel took 52 us per layer (H200, the 2026-12-04
# 20:57 profile) for ~6 GFLOP and 16 MB of reads. (128, 256, 64, 8, 3) was dropped: it asks for
# 256 KiB of shared memory, over Hopper's 227 KiB (the every-config GPU test, 2026-12-05), so the
# tuner had only ever skipped it.
CONFIGS = [(128, 256, 32, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
           (64, 256, 64, 4, 3), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3), (64, 64, 64, 4, 3),
           (32, 128, 64, 4, 3)]


if triton is not None:
    @triton.jit
    def _round_bf16(v):
        """fp32 -> the nearest bf16 value (ties to even), kept in fp32: torch's rounding, spelled
        out in integer ops (the interpreter's fp32 -> bf16 cast truncates; CUDA's is the same RNE).
        NaN passes through (the add would carry CUDA's 0x7FFFFFFF NaN into -0.0)."""
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return tl.where(v != v, v, b.to(tl.float32, bitcast=True))

    @triton.jit
    def _logits_kernel(x_ptr, w_ptr, out_ptr, N, D, E, stride_x, stride_w, N_BUCKET,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32_DOT: tl.constexpr):
        """N_BUCKET (`rows_bucket(N)`) is read only by the autotuner: part of its key."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_ok, col_ok = rows < N, cols < E
        x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        w_col = w_ptr + cols.to(tl.int64)[None, :] * stride_w  # w is [E, d]: the tile is w^T's
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            k_ok = (k0 + ks) < D
            x = tl.load(x_row + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_col + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if F32_DOT:  # the interpreter: its casts truncate, so the rounding is spelled out; the
                # same exact products of bf16 values, fp32 sums
                xh, wh = _round_bf16(x), _round_bf16(w)
                xl, wl = _round_bf16(x - xh), _round_bf16(w - wh)
                acc = tl.dot(xh, wh, acc, input_precision="ieee")
                acc = tl.dot(xh, wl, acc, input_precision="ieee")
                acc = tl.dot(xl, wh, acc, input_precision="ieee")
            else:  # CUDA's fp32 -> bf16 casts round to nearest even, as torch's split; bf16 MMAs
                xh, wh = x.to(tl.bfloat16), w.to(tl.bfloat16)
                xl, wl = (x - xh.to(tl.float32)).to(tl.bfloat16), (w - wh.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(xh, wh, acc)
                acc = tl.dot(xh, wl, acc)
                acc = tl.dot(xl, wh, acc)
        out = out_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


_kernel = None


def _tuned():
    """The kernel, autotuned per (d, E, rows bucket) on CUDA; the interpreter (no driver to time
    with) runs it with small tiles (`_untuned_config`) so that tests cross every tile edge."""
    global _kernel
    if _kernel is None:
        _kernel = autotuned(_logits_kernel, CONFIGS, ["D", "E", "N_BUCKET"])
    return _kernel


def rows_bucket(n: int) -> int:
    """The autotuning bucket of a token count: the power of two at or above it, from 16 up to 2^20
    (a few buckets, so a sampler's varying batch sizes tune a few times, not once per size)."""
    return min(max(1 << max(n - 1, 0).bit_length(), 16), 1 << 20)


def _untuned_config() -> dict:
    return {"BM": 16, "BN": 16, "BK": 16} if interpreting() else {}


def _f32_dot() -> bool:
    """The interpreter's bf16 dot misreads in-kernel casts: it multiplies in fp32 instead."""
    return interpreting()


def split_hi_lo(t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 t -> (hi, lo) in `dtype` with t ~ hi + lo (hi = t rounded, lo = the rest rounded)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).to(dtype)


@torch.library.custom_op("vpmoe::router_logits_fused", mutates_args=())
def router_logits_fused(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, d] @ w [E, d]^T -> [N, E] fp32, both fp32 with unit column stride, each split into bf16
    pairs per tile in registers (see the module docstring). Same function as
    `kernels.mm_bf16x3(x, w.t())`."""
    if triton is None:
        raise RuntimeError("router_logits_fused: Triton is not installed (use kernels.mm_bf16x3)")
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.stride(-1) != 1 or w.stride(-1) != 1
            or w.ndim != 2 or w.shape[1] != x.shape[1]):
        raise ValueError(f"router_logits_fused: wants fp32 x [N, d] and w [E, d], each with unit column stride; "
                         f"got x {tuple(x.shape)} {x.dtype} stride {x.stride()}, w {tuple(w.shape)} {w.dtype} "
                         f"stride {w.stride()}")
    N, D = x.shape
    E = w.shape[0]
    out = x.new_empty(N, E)
    _tuned()[lambda meta: (triton.cdiv(N, meta["BM"]), triton.cdiv(E, meta["BN"]))](
        x, w, out, N, D, E, x.stride(0), w.stride(0), rows_bucket(N),
        F32_DOT=_f32_dot(), **_untuned_config())
    return out


@router_logits_fused.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])

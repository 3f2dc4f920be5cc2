"""The Gram-side Newton-Schulz iteration of one restart segment as one Triton kernel (on in
captured optimizer steps: `FastMuonAdamW.gram_kernel`; the 20-layer optimizer step alone
24.50 -> 21.06 ms on an H200, docs/performance.md).

`optim_fast.gram_newton_schulz_parts` iterates on the n x n side: per step Z = a*I + b*R + c*R@R,
Q <- Z Q and (except at a segment's last step) R <- Z R Z, all n x n with n = 128 at vpMoE's
experts. In torch each of those is a batched GEMM over ~1,000 matrices that reads two fp16
128 x 128 operands and writes one: ~43 FLOP per byte, under the H200's ridge, so each launch is
memory-bound (~26 us at ~3.9 TB/s in the 2026-12-02 profile: 140 such launches, 3.6 ms per (a)
step, plus the polynomial's pointwise passes). Here one program holds one matrix's R, Z and Q on
chip for the whole segment: it reads R once and writes Q once.

Design choices:
- One program per matrix, the whole [n, n] tile at once (n <= 128: vpMoE's expert width; a larger
  tile would not fit on chip beside its operands), so no K loop and no cross-program reduction.
- The same rounding points as the torch path on CUDA: R@R accumulated in fp32 and the polynomial
  in fp32, then Z rounded to fp16; Z@Q, Z@R and (ZR)@Z each accumulated in fp32 and rounded to fp16.
  Only the order of each dot's sums differs.
- Padding (n < the tile): R's padded rows and columns are zero and stay zero; Z gets `a` on the
  padded diagonal, which keeps every product block-diagonal; the padding is never stored.
- `gram_segment` is a `torch.library.custom_op` (traceable inside the compiled optimizer pieces,
  capturable in CUDA graphs: fixed grid for fixed shapes); `gram_segment_reference` is the torch
  path, used wherever the kernel does not apply (`applies`). tests/test_ns_gram.py runs the kernel
  under the Triton interpreter against it and float64.
"""
from __future__ import annotations

import torch

from vpmoe.model.router_fused import _f32_dot  # the interpreter multiplies in fp32 (same products)
from vpmoe.model.tpa_fused import available  # the same test for every Triton op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None

MAX_N = 128  # the matrix side the kernel takes (held whole on chip)


def bmm_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with fp32 accumulation and fp32 (or fp64) output; bf16/fp16 on CUDA keep the exact
    fp32 sum instead of a half-precision rounded product (`bmm(out_dtype=)`); elsewhere the same
    exact products summed in fp32 (the CPU's half bmm would round its output)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        if x.is_cuda:
            return torch.bmm(x, y, out_dtype=torch.float32)
        return torch.bmm(x.float(), y.float())
    return torch.bmm(x, y).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def gram_segment_reference(r: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """Q = Z_steps ... Z_1 for R [batch, n, n] (already normalised, in the iteration's small dtype),
    with Z_k = a*I + b*R_k + c*R_k^2 and R_{k+1} = Z_k R_k Z_k; Q in r's dtype."""
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    eye = torch.eye(r.shape[-1], device=r.device, dtype=acc)
    q = None
    for i in range(steps):
        z = (bmm_f32(r, r).to(acc) * c + r.to(acc) * b + eye * a).to(r.dtype)  # one pass; no baddbmm copy
        q = z if q is None else torch.bmm(z, q)
        if i + 1 < steps:
            r = torch.bmm(torch.bmm(z, r), z)
    return q


if triton is not None:
    @triton.jit
    def _dot16(x, y, F32_DOT: tl.constexpr):
        """fp16 x fp16 with fp32 accumulation (the interpreter: the same products in fp32)."""
        if F32_DOT:
            return tl.dot(x.to(tl.float32), y.to(tl.float32))
        return tl.dot(x, y)

    @triton.jit
    def segment(r, a_eye, b, c, STEPS: tl.constexpr, F32_DOT: tl.constexpr):
        """Q = Z_STEPS ... Z_1 of the fp16 [n, n] tile r (`gram_segment_reference`'s roundings), in fp16;
        also the streaming experts' restart kernel's two segments (`expert_muon._chain_kernel`)."""
        q = r  # replaced at step 0 (STEPS >= 1)
        for i in tl.static_range(STEPS):
            z = (_dot16(r, r, F32_DOT) * c + r.to(tl.float32) * b + a_eye).to(tl.float16)
            if i == 0:
                q = z
            else:
                q = _dot16(z, q, F32_DOT).to(tl.float16)
            if i + 1 < STEPS:
                zr = _dot16(z, r, F32_DOT).to(tl.float16)
                r = _dot16(zr, z, F32_DOT).to(tl.float16)
        return q

    @triton.jit
    def _gram_segment_kernel(r_ptr, q_ptr, N, sr_b, sr_m, sr_n, sq_b, sq_m, sq_n, a, b, c,
                             STEPS: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        idx = tl.arange(0, BN)
        ok = (idx < N)[:, None] & (idx < N)[None, :]
        r = tl.load(r_ptr + pid * sr_b + idx[:, None] * sr_m + idx[None, :] * sr_n, mask=ok, other=0.0)
        a_eye = tl.where(idx[:, None] == idx[None, :], a, 0.0)
        q = segment(r, a_eye, b, c, STEPS, F32_DOT)
        tl.store(q_ptr + pid * sq_b + idx[:, None] * sq_m + idx[None, :] * sq_n, q, mask=ok)


def applies(r: torch.Tensor) -> bool:
    """Whether the kernel serves this R: fp16 [batch, n, n] with n <= MAX_N on CUDA (or the
    interpreter); else `gram_segment_reference`."""
    return (triton is not None and available(r.device) and r.dtype == torch.float16 and r.ndim == 3
            and r.shape[-1] == r.shape[-2] <= MAX_N)


@torch.library.custom_op("vpmoe::gram_segment", mutates_args=())
def gram_segment(r: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """`gram_segment_reference` as one kernel launch: r fp16 [batch, n, n], n <= 128."""
    if not applies(r) or steps < 1:
        raise ValueError(f"gram_segment: wants fp16 r [batch, n, n] with n <= {MAX_N} on CUDA and steps >= 1; "
                         f"got {tuple(r.shape)} {r.dtype} on {r.device}, steps {steps}")
    q = torch.empty_like(r)
    n = r.shape[-1]
    _gram_segment_kernel[(r.shape[0],)](
        r, q, n, *r.stride(), *q.stride(), float(a), float(b), float(c),
        STEPS=steps, BN=max(16, triton.next_power_of_2(n)), F32_DOT=_f32_dot(), num_warps=8)
    return q


@gram_segment.register_fake
def _(r, steps, a, b, c):
    return torch.empty_like(r)

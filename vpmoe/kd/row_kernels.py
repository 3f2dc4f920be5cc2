"""The fused loss's two vocabulary-wide passes as Triton kernels: the row log-sum-exp and the
in-place "rest" gradient, each in one pass at 3.0-3.9 TB/s on an H200.

Per [C, V] logits chunk (V = 201088) the fused CE/KD loss (`vpmoe.kd.fused`) needs
    lse[c]  = logsumexp_v z[c, v]                      (entries at -inf are skipped)
    z[c, v] <- scale[c] * exp(z[c, v] - lse[c])        (in place: the chunk becomes its gradient)
Compiled by Inductor (dynamic shapes) these ran at ~1.2 and ~1.6 TB/s on an H200, 112 ms of a
3.1 s 80-layer step (bench/RESULTS.md `profile`, 2026-12-01; likely a max pass and a sum pass
over the chunk, not verified). Here:
- `row_lse`: one pass, one exponential per element: a program per (row, segment of
  SEGMENT_BLOCKS x BLOCK columns) keeps a running (max, sum of exp(z - max)) over its blocks and
  writes the pair; torch combines the few pairs per row. Segments rather than a program per row:
  ~14k programs per 2048-row chunk instead of 2,048, for more loads in flight (the per-row
  version was not measured).
- `rest_grad_`: a 2-D grid of (row, column block) programs, read once, written once, in place.
- `scale_unless_one_`: the loss's backward scales the gradients it made in forward (the fp32 head
  gradient: [V, d], 0.82 GB at vpMoE's dims) by the incoming 0-d gradient. The trainer's loss is
  backpropagated with gradient 1 (the step's normalisation is inside it), so each program reads
  that scalar and returns at once when it is 1: a launch instead of a ~0.45 ms pass per (a) step
  (2026-12-04 profile), decided on the device (no host read, so a CUDA graph captures it).
Both keep fp32 math for bf16/fp16/fp32 storage. The plain torch functions beside them are the
reference (and the fallback: CPU, float64, no Triton); tests/test_row_kernels.py runs the kernels
in the Triton interpreter against float64 on the CPU, tests/gpu/ on the GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

BLOCK = 4096  # columns per step (row_lse) / per program (rest_grad_): 8-16 KB of a row
SEGMENT_BLOCKS = 8  # blocks per row_lse program (32k columns: 7 segments per row at V = 201088)
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def row_lse_reference(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim in fp32 (fp64 for fp64): [C, V] -> [C]."""
    return torch.logsumexp(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), dim=-1)


def rest_grad_reference_(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z <- scale * exp(z - lse) per row, in place; -inf entries give exactly 0."""
    return z.copy_((torch.exp(z.to(lse.dtype) - lse[:, None]) * scale[:, None]).to(z.dtype))


def scale_reference_(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x *= s (a 0-d tensor, rounded to x's dtype) in place, read on the device: a foreach multiply
    (a plain `mul_` by a 0-d CUDA tensor runs torch's unvectorised broadcasting kernel)."""
    torch._foreach_mul_([x], s.to(x.dtype))
    return x


def interpreting() -> bool:
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def kernels_serve(z: torch.Tensor, lse: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernels take this chunk: CUDA (or the interpreter), a kernel dtype, 2-D
    with unit column stride (and, for `rest_grad_`, an fp32 lse)."""
    return (triton is not None and (z.is_cuda or interpreting()) and z.dtype in KERNEL_DTYPES
            and z.dim() == 2 and z.stride(1) == 1 and (lse is None or lse.dtype == torch.float32))


if triton is not None:
    @triton.jit
    def _row_lse_kernel(z_ptr, max_ptr, sum_ptr, stride, V: tl.constexpr, SEGMENT: tl.constexpr,
                        BLOCK: tl.constexpr):
        # constexpr bounds: the loop stays a loop, and the Triton interpreter (CPU tests) can run it
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        base = z_ptr + row * stride
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # running max, 0-d
        s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # running sum of exp(z - m)
        for start in range(0, SEGMENT, BLOCK):
            cols = seg * SEGMENT + start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # an all -inf prefix keeps m_new = -inf: nothing to rescale or add (avoids inf - inf)
            finite = m_new > float("-inf")
            shift = tl.where(finite, m_new, 0.0)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        out = row * tl.num_programs(1) + seg
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, s)

    @triton.jit
    def _rest_grad_kernel(z_ptr, lse_ptr, scale_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ptr = z_ptr + row * stride + cols
        ok = cols < V
        x = tl.load(ptr, mask=ok, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + row).to(tl.float32)
        scale = tl.load(scale_ptr + row).to(tl.float32)
        tl.store(ptr, (tl.exp(x - lse) * scale).to(z_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _scale_unless_one_kernel(x_ptr, s_ptr, n, BLOCK: tl.constexpr):
        s = tl.load(s_ptr).to(tl.float32)  # stored in x's dtype: the reference's rounding
        if s != 1.0:  # gradient 1 (the trainer's case): nothing read, nothing written
            for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                ok = offs < n
                x = tl.load(x_ptr + offs, mask=ok)
                tl.store(x_ptr + offs, (x.to(tl.float32) * s).to(x_ptr.dtype.element_ty), mask=ok)


def _block(V: int) -> int:
    return min(BLOCK, triton.next_power_of_2(V))


def row_lse(z: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of z [C, V] in fp32 (fp64 for fp64); Triton where `kernels_serve`."""
    if not kernels_serve(z):
        return row_lse_reference(z)
    C, V = z.shape
    block = _block(V)
    segment = block * SEGMENT_BLOCKS
    n_seg = triton.cdiv(V, segment)
    maxes = torch.empty(C, n_seg, dtype=torch.float32, device=z.device)
    sums = torch.empty_like(maxes)
    if C:
        _row_lse_kernel[(C, n_seg)](z, maxes, sums, z.stride(0), V=V, SEGMENT=segment, BLOCK=block, num_warps=8)
    m = maxes.amax(1)
    shift = torch.where(m > float("-inf"), m, 0.0)  # an all -inf row: lse -inf, no inf - inf
    total = (sums * torch.exp(maxes - shift[:, None])).sum(1)
    return torch.where(m > float("-inf"), shift + torch.log(total), m)


def rest_grad_(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z <- scale[:, None] * exp(z - lse[:, None]) in place (returns z); Triton where `kernels_serve`."""
    if not kernels_serve(z, lse):
        return rest_grad_reference_(z, lse, scale)
    C, V = z.shape
    if C:
        block = _block(V)
        _rest_grad_kernel[(C, triton.cdiv(V, block))](z, lse.contiguous(), scale.contiguous(), V, z.stride(0),
                                                    BLOCK=block, num_warps=8)
    return z


def scale_unless_one_(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x *= s in place (returns x), the same products as `scale_reference_`; with Triton (a
    contiguous tensor of a kernel dtype on CUDA, or the interpreter) a grid-stride kernel that
    touches nothing when s is 1."""
    if not (triton is not None and (x.is_cuda or interpreting()) and x.dtype in KERNEL_DTYPES
            and x.is_contiguous() and s.numel() == 1):
        return scale_reference_(x, s)
    if x.numel():
        # a few waves of programs, each striding over the tensor (the interpreter: small, to stride)
        programs = 4 if interpreting() else 8 * torch.cuda.get_device_properties(x.device).multi_processor_count
        block = 128 if interpreting() else BLOCK
        grid = min(programs, triton.cdiv(x.numel(), block))
        _scale_unless_one_kernel[(grid,)](x, s.to(x.dtype).reshape(1), x.numel(), BLOCK=block,
                                          **({} if interpreting() else {"num_warps": 8}))
    return x

"""Grouped GEMMs over rows sorted by expert: the primitives the routed experts are built from.

Design choices:
- `grouped_mm` is one `torch._grouped_mm` launch for all experts (group ends on the device, no host
  sync). CUDA's kernel takes bf16 only and the CPU's takes no float64, so those dtypes loop over
  the groups (tests only).
- The backward products are custom ops (`grouped_mm_t`, `grouped_wgrad`, `gather_rows_with_ones`)
  so that the compiler sees neither their transposes nor their gathers. Each op's docstring says
  what went wrong without it: a device assert, a kept [N*k, d] tensor, a weight cast written twice.
- `grouped_expert_ffn` carries the biases inside the GEMMs (a ones column on the rows, the bias as a
  weight row). It serves the expert-parallel path's arrived rows; `kernels.routed_experts` keeps
  the GEMMs at the weights' own shapes instead.
"""
from __future__ import annotations

import torch

from vpmoe.model import model as M


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.custom_op("vpmoe::gather_rows_with_ones", mutates_args=())
def gather_rows_with_ones(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """with_ones(x[index], width), opaque to the compiler: `_GatherGemm`'s backward gathers its rows
    again through this op so that the partitioner cannot merge the gather with the forward's
    identical one (and then keep the [N*k, d] rows after all, which it did). Widened before the
    gather: one pass over the N*k rows in eager mode. (`torch.gather` inside the graph instead
    also kept the rows out, but Inductor then laid the rows out column-major, and the weight
    gradient's grouped GEMM refused groups whose size is not a multiple of 8: a device assert.)"""
    return with_ones(x, width).index_select(0, index)


@gather_rows_with_ones.register_fake
def _(x, index, width):
    return x.new_empty(index.shape[0], width)


def _loop_groups(x: torch.Tensor) -> bool:
    """CUDA's grouped kernel is bf16-only and the CPU's takes no float64: those loop (tests only)."""
    return (x.is_cuda and x.dtype != torch.bfloat16) or x.dtype == torch.float64


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, a] (rows sorted by group) @ w[g] [a, b] per group; offsets = group ends (int32)."""
    if _loop_groups(x):
        out, start = x.new_zeros(x.shape[0], w.shape[-1]), 0
        for g, end in enumerate(offsets.tolist()):
            if end > start:
                out[start:end] = x[start:end] @ w[g]
            start = end
        return out
    return torch._grouped_mm(x, w, offs=offsets)


def grouped_mm_t(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_mm(x, w.transpose(-2, -1), offsets)` (the input gradient), transposed inside an op:
    with the transpose in the graph, the partitioner kept the transposed view of the forward's bf16
    weight cast for backward and Inductor wrote the cast twice (38 x 67 MB per (a) step)."""
    if _loop_groups(x):
        return grouped_mm(x, w.transpose(-2, -1), offsets)
    return _grouped_mm_t(x, w, offsets)


@torch.library.custom_op("vpmoe::grouped_mm_t", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _grouped_mm_t(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


@_grouped_mm_t.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-2])


def grouped_mm_wgrad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[G, a, b] with out[g] = x[rows of g]^T @ g[rows of g] (zero for an empty group): the weight
    gradient of `grouped_mm`, in the form torch's own autograd formula calls."""
    if _loop_groups(x):
        out, start = x.new_zeros(offsets.numel(), x.shape[1], g.shape[1]), 0
        for grp, end in enumerate(offsets.tolist()):
            out[grp] = x[start:end].T @ g[start:end]
            start = end
        return out
    return _grouped_wgrad(x, g, offsets)


@torch.library.custom_op("vpmoe::grouped_wgrad", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _grouped_wgrad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(x.t(), g)` on row-major x and g, as an op the compiler cannot see into:
    inside a compiled graph Inductor may lay a tensor that only reaches the GEMM as `x.t()` out
    column-major, and the kernel then takes the rows' dimension as contiguous and refuses groups
    whose size is not a multiple of 8 (a device assert, seen twice on the H200). A custom op gets
    its inputs with the strides they were traced with (row-major here), so `contiguous` is free."""
    return torch._grouped_mm(x.contiguous().t(), g.contiguous(), offs=offsets)


@_grouped_wgrad.register_fake
def _(x, g, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], g.shape[1])


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def with_ones(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., a] -> [..., width]: x, a column of ones, zeros (the bias row's input; 16-byte rows)."""
    tail = x.new_zeros(*x.shape[:-1], width - x.shape[-1])
    tail[..., 0] = 1
    return torch.cat([x, tail], -1)


class _WithBias(torch.autograd.Function):
    """w [E, a, n], b [E, n] -> [E, width, n]: the rows of w, then b, then zero rows. The gradients
    are returned contiguous: as slices of the [E, width, n] gradient they would reach
    AccumulateGrad strided, whose add then runs unvectorised (measured: ~50 ms per full-model
    step on an H200); compiled, the copy fuses with the bf16 -> fp32 cast before it."""

    @staticmethod
    def forward(ctx, w, b, width: int):
        E, a, n = w.shape
        ctx.a = a
        return torch.cat([w, b.unsqueeze(1), w.new_zeros(E, width - a - 1, n)], 1)

    @staticmethod
    def backward(ctx, g):
        a = ctx.a
        return g[:, :a].contiguous(), g[:, a].contiguous(), None


def with_bias(w: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    return _WithBias.apply(w, b, width)


def grouped_expert_ffn(xs: torch.Tensor, offsets: torch.Tensor, w_up, b_up, w_down, b_down) -> torch.Tensor:
    """Rows already sorted by expert (group ends `offsets`): the squared-ReLU expert FFN with biases,
    as two grouped GEMMs in xs's dtype; output in xs's dtype.

    The biases ride inside the GEMMs: each input row gets a ones column (`with_ones`, padded to a
    multiple of 8 columns for the kernel's 16-byte alignment) and each weight its bias as an extra
    row (`with_bias`). So the bias add is part of the fp32 accumulation, and the bias gradient
    comes out of the grouped GEMM's own weight gradient, with no per-row scatter (atomics) and no
    separate reduction; the widths are then off the tile grid (`routed_experts` avoids that; this
    form serves the expert-parallel path's arrived rows). xs may arrive already widened."""
    dt, acc = xs.dtype, _acc(xs)
    k_up, k_down = _round8(w_up.shape[1] + 1), _round8(w_down.shape[1] + 1)
    if xs.shape[-1] != k_up:
        xs = with_ones(xs, k_up)
    h = grouped_mm(xs, with_bias(w_up, b_up, k_up).to(dt), offsets)
    h = M.squared_relu(h.to(acc)).to(dt)
    return grouped_mm(with_ones(h, k_down), with_bias(w_down, b_down, k_down).to(dt), offsets)

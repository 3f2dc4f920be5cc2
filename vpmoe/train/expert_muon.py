"""The routed experts' Muon step as streaming Triton kernels (`FastMuonAdamW`'s default on CUDA:
`optim_fast.STREAM_EXPERTS`; `stream_experts=False` keeps the packed torch path).

Per expert tensor [E, m, n] (vpMoE: 256 matrices of 128 x 1024, the up projection stored
transposed), the packed torch path moves ~36 bytes per parameter: the momentum pass (read the
gradient and momentum, write the momentum and the bf16 update U: 12), the first Gram R = U U^T
(read U: 2), the restart X' = Q U and its Gram (read U, write X', read X': 6), the last product
Q X' (read X', write O: 4) and the update (read O, read and write W, write its bf16 copy: 12).
Here each matrix's Gram is accumulated in the kernel that streams its operand, so no pass reads
U or X' only to form R:

- `momentum_gram`: momentum, Nesterov and the bf16 U as `optim_fast._muon_pre` computes them,
  and R = U U^T summed over column tiles in the same program; the Frobenius scale comes from R's
  trace (||U||^2) and R leaves normalised, in the Gram iteration's fp16 (12 bytes per parameter).
- `restart_gram`: X' = bf16(bf16(Q * scale) U) tile by tile, and R' = X' X'^T from the tiles in
  registers (4 bytes).
- the last product and the update: `ns_update.qx_update` with the bf16 weight copy written beside
  W (12 bytes); it takes the last Gram segment's fp16 Q and rounds it to bf16 as it loads it.
The n x n iterations between them stay `ns_gram.gram_segment`. 28 bytes per parameter instead of
~36, and per tensor four launches instead of ~20. By bytes ~-3 ms of the (a) step on an H100;
measured there (2026-12-05, one lease): the 20-layer optimizer alone 29.27 -> 27.73 ms, (a) 61.19
-> 59.95 ms. Alone, the momentum and update kernels stream at ~1.8-2.0 TB/s where the packed
path's compiled pointwise passes reach ~3.0 (bench/RESULTS.md, 2026-12-05 21:32): one program per
matrix holds the [128, 128] accumulator (128-255 registers a thread), so one program per SM, and
its loads wait on each tile's math (a software prefetch, `PREFETCH`, did not help). That is the
gap left (docs/performance.md).

Design choices:
- The same rounding points as the torch path (`gram_newton_schulz_parts`): U rounded to bf16 before
  its Gram, the Gram accumulated in fp32 and rounded to fp16 after the scale, Q * scale rounded to
  bf16, each product accumulated in fp32 and rounded to bf16. Only the order of the sums differs,
  so the reference path is the test oracle at tight tolerances (tests/test_expert_muon.py, under
  the Triton interpreter; float64 Newton-Schulz beside it).
- One program per matrix (m <= 128 rows held whole; the column loop streams the long side), so no
  cross-program reduction and no atomics; a [128, 128] fp32 accumulator per program.
- Strides are taken as given: the transposed up weights are read and written in their own layout
  (U, X' and W share it), so no transposed copies.
- Custom ops (capturable in CUDA graphs: fixed grids for fixed shapes); `muon_step` runs the chain
  for one tensor and applies where the kernels do (`applies`: CUDA or the interpreter, bf16
  Newton-Schulz, fp32 weights, m <= 128).
"""
from __future__ import annotations

import torch

from vpmoe.model.router_fused import (
    _f32_dot,  # the interpreter multiplies in fp32 (same products)
)
from vpmoe.model.tpa_fused import available, interpreting
from vpmoe.train import ns_gram, ns_update
from vpmoe.train.ns_gram import bmm_f32
from vpmoe.train.optim import GRAM_RESTART_AT, NS_COEFFS

try:
    import triton
    import triton.language as tl

    from vpmoe.model.router_fused import _round_bf16
except ImportError:  # CPU-only installs: the packed torch path
    triton = None

MAX_M = 128  # the short side held whole per program
# (columns per tile, warps, pipeline stages, software prefetch) per kernel at 128 rows: the [128, 128]
# fp32 accumulator is 64 registers a thread at 8 warps, so wider tiles or fewer warps spill (ptxas
# for sm_90, bench/kernel_registers.py), yet 64 columns timed fastest on an H100 and prefetch did not
# help (2026-12-05 20:20 and 21:32, bench/expert_muon.py, which times the alternatives). The restart
# None: two cuBLAS products (`restart_gram_reference`), faster alone but slower in the step (the
# 20-layer optimizer 28.57 against 27.68 ms with the kernel; the 21:38 section): an A/B option
RESTART_KERNEL = (64, 8, 2, False)
CONFIGS = {"momentum": (64, 16, 2, False), "restart": RESTART_KERNEL}


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [b, m, n] view Newton-Schulz iterates on (m the short side)."""
    return t.mT if transposed else t


def momentum_gram_reference(g, buf, coef, mu: float, nesterov: bool, transposed: bool, eps: float = 1e-7):
    """The torch path's first part: U = `_muon_pre` (buf updated in place), then R = U U^T (fp32
    sums), the scale 1 / (||U|| + eps) from its trace, R * scale^2 in fp16; returns (U, R, scale)."""
    # here, not at the top: optim_fast imports this module
    from vpmoe.train.optim_fast import _muon_pre, gram_scale
    u = _muon_pre(g, buf, coef, mu, nesterov, torch.bfloat16)
    x = _oriented(u, transposed)
    r = bmm_f32(x, x.mT)
    scale = gram_scale(r, eps)
    return u, (r * scale[:, None, None] ** 2).to(torch.float16), scale


def restart_gram_reference(q, scale, x, transposed: bool):
    """The torch path's restart: X' = bf16(Q * scale) X in bf16, R' = X' X'^T in fp16; x and the
    returned X' in the weight's layout (for transposed weights X'^T = X^T (Q * scale)^T, so no
    transposed copy); returns (X', R'). `CONFIGS["restart"]` None runs it on CUDA too: two
    cuBLAS products, faster than `restart_gram` alone and slower in the step (bench/RESULTS.md, 2026-12-05 21:38)."""
    qs = (q.float() * scale[:, None, None]).to(torch.bfloat16)
    y = torch.bmm(x, qs.mT) if transposed else torch.bmm(qs, x)
    yo = _oriented(y, transposed)
    return y, bmm_f32(yo, yo.mT).to(torch.float16)


if triton is not None:
    @triton.jit
    def _dot(x, y, F32_DOT: tl.constexpr):
        """x @ y of bf16-valued fp32 tiles with fp32 accumulation (bf16 MMA; the interpreter: fp32)."""
        if F32_DOT:
            return tl.dot(x, y)
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))

    @triton.jit
    def _momentum_gram_kernel(g_ptr, buf_ptr, u_ptr, r_ptr, scale_ptr, coef_ptr, M, N, mu, eps,
                              sg_b, sg_m, sg_n, sb_b, sb_m, sb_n, su_b, su_m, su_n, sr_b, sr_m, sr_n,
                              NESTEROV: tl.constexpr, BUF_BF16: tl.constexpr, BM: tl.constexpr,
                              BN: tl.constexpr, PREFETCH: tl.constexpr, F32_DOT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BM)
        row_ok = rows < M
        coef = tl.load(coef_ptr)
        g_tile = g_ptr + b * sg_b + rows[:, None] * sg_m + tl.arange(0, BN)[None, :] * sg_n
        b_tile = buf_ptr + b * sb_b + rows[:, None] * sb_m + tl.arange(0, BN)[None, :] * sb_n
        if PREFETCH:  # the next tile's loads in flight while this one is computed and stored
            ok = row_ok[:, None] & (tl.arange(0, BN) < N)[None, :]
            g_next = tl.load(g_tile, mask=ok, other=0.0)
            m_next = tl.load(b_tile, mask=ok, other=0.0)
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            if PREFETCH:
                g, m = g_next, m_next
                ok_next = row_ok[:, None] & (cols + BN < N)[None, :]
                g_next = tl.load(g_tile + (n0 + BN) * sg_n, mask=ok_next, other=0.0)
                m_next = tl.load(b_tile + (n0 + BN) * sb_n, mask=ok_next, other=0.0)
            else:
                g = tl.load(g_tile + n0 * sg_n, mask=ok, other=0.0)
                m = tl.load(b_tile + n0 * sb_n, mask=ok, other=0.0)
            g = g.to(tl.float32) * coef
            m = m.to(tl.float32) * mu + g
            if BUF_BF16:
                tl.store(b_tile + n0 * sb_n, _round_bf16(m).to(tl.bfloat16), mask=ok)
            else:
                tl.store(b_tile + n0 * sb_n, m, mask=ok)
            if NESTEROV:
                u = _round_bf16(g + mu * m)
            else:
                u = _round_bf16(m)
            tl.store(u_ptr + b * su_b + rows[:, None] * su_m + cols[None, :] * su_n, u.to(tl.bfloat16), mask=ok)
            acc += _dot(u, tl.trans(u), F32_DOT)
        trace = tl.sum(tl.sum(tl.where(rows[:, None] == rows[None, :], acc, 0.0), axis=1), axis=0)
        scale = 1.0 / (tl.sqrt(tl.maximum(trace, 0.0)) + eps)
        ok_r = row_ok[:, None] & row_ok[None, :]
        tl.store(r_ptr + b * sr_b + rows[:, None] * sr_m + rows[None, :] * sr_n,
                 (acc * (scale * scale)).to(tl.float16), mask=ok_r)
        tl.store(scale_ptr + b, scale)

    @triton.jit
    def _restart_gram_kernel(q_ptr, scale_ptr, x_ptr, y_ptr, r_ptr, M, N,
                             sq_b, sq_m, sq_k, sx_b, sx_m, sx_n, sy_b, sy_m, sy_n, sr_b, sr_m, sr_n,
                             BM: tl.constexpr, BN: tl.constexpr, PREFETCH: tl.constexpr, F32_DOT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BM)
        row_ok = rows < M
        ok_q = row_ok[:, None] & row_ok[None, :]
        q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_m + rows[None, :] * sq_k, mask=ok_q, other=0.0)
        q = _round_bf16(q.to(tl.float32) * tl.load(scale_ptr + b))
        x_tile = x_ptr + b * sx_b + rows[:, None] * sx_m + tl.arange(0, BN)[None, :] * sx_n
        if PREFETCH:
            x_next = tl.load(x_tile, mask=row_ok[:, None] & (tl.arange(0, BN) < N)[None, :], other=0.0)
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            if PREFETCH:
                x = x_next
                x_next = tl.load(x_tile + (n0 + BN) * sx_n, mask=row_ok[:, None] & (cols + BN < N)[None, :], other=0.0)
            else:
                x = tl.load(x_tile + n0 * sx_n, mask=ok, other=0.0)
            y = _round_bf16(_dot(q, x.to(tl.float32), F32_DOT))
            tl.store(y_ptr + b * sy_b + rows[:, None] * sy_m + cols[None, :] * sy_n, y.to(tl.bfloat16), mask=ok)
            acc += _dot(y, tl.trans(y), F32_DOT)
        tl.store(r_ptr + b * sr_b + rows[:, None] * sr_m + rows[None, :] * sr_n, acc.to(tl.float16), mask=ok_q)


def applies(device: torch.device, w_dtype: torch.dtype, m: int) -> bool:
    """Whether the kernels serve an expert tensor on `device` with weights in `w_dtype` and short
    side m (bf16 Newton-Schulz is the caller's: `FastMuonAdamW` on CUDA)."""
    return (triton is not None and available(device) and w_dtype == torch.float32 and m <= MAX_M)


def _launch(kernel: str, m: int) -> dict:
    """Tile and launch settings for `kernel` ("momentum" or "restart") at short side m: the rows
    whole, `CONFIGS`' columns (16 in the interpreter, to keep it quick)."""
    # a restart None sends `muon_step` to cuBLAS; `restart_gram` called as such takes RESTART_KERNEL
    bn, warps, stages, prefetch = CONFIGS[kernel] or RESTART_KERNEL
    return dict(BM=max(16, triton.next_power_of_2(m)), BN=16 if interpreting() else bn, num_warps=warps,
                num_stages=stages, PREFETCH=prefetch)


@torch.library.custom_op("vpmoe::momentum_gram", mutates_args=("buf",))
def momentum_gram(g: torch.Tensor, buf: torch.Tensor, coef: torch.Tensor, mu: float, nesterov: bool,
                  transposed: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`momentum_gram_reference` in one launch: g (any float dtype) and buf (fp32 or bf16) [b, m, n]
    (or [b, n, m] when `transposed`), coef a 0-dim fp32 device tensor; returns U (bf16, g's layout),
    R (fp16 [b, m, m]) and the scale (fp32 [b])."""
    bsz = g.shape[0]
    m, n = (g.shape[2], g.shape[1]) if transposed else (g.shape[1], g.shape[2])
    if not applies(g.device, torch.float32, m) or buf.shape != g.shape or buf.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"momentum_gram: wants g and buf (fp32 or bf16) of one shape [b, m, n] with m <= {MAX_M} "
                         f"on CUDA; got g {tuple(g.shape)} {g.dtype}, buf {tuple(buf.shape)} {buf.dtype} on {g.device}")
    u = torch.empty_like(g, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
    r = torch.empty(bsz, m, m, device=g.device, dtype=torch.float16)
    scale = torch.empty(bsz, device=g.device, dtype=torch.float32)
    gv, bv, uv = (_oriented(t, transposed) for t in (g, buf, u))
    _momentum_gram_kernel[(bsz,)](
        gv, bv, uv, r, scale, coef, m, n, float(mu), float(eps), *gv.stride(), *bv.stride(), *uv.stride(),
        *r.stride(), NESTEROV=bool(nesterov), BUF_BF16=buf.dtype == torch.bfloat16, F32_DOT=_f32_dot(),
        **_launch("momentum", m))
    return u, r, scale


@momentum_gram.register_fake
def _(g, buf, coef, mu, nesterov, transposed, eps):
    m = g.shape[2] if transposed else g.shape[1]
    return (torch.empty_like(g, dtype=torch.bfloat16, memory_format=torch.contiguous_format),
            g.new_empty(g.shape[0], m, m, dtype=torch.float16), g.new_empty(g.shape[0], dtype=torch.float32))


@torch.library.custom_op("vpmoe::restart_gram", mutates_args=())
def restart_gram(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                 transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`restart_gram_reference` in one launch: q fp16 [b, m, m], scale fp32 [b], x bf16 in the
    weight's layout; returns X' (bf16, that layout) and R' (fp16 [b, m, m])."""
    bsz = x.shape[0]
    m, n = (x.shape[2], x.shape[1]) if transposed else (x.shape[1], x.shape[2])
    if (not applies(x.device, torch.float32, m) or x.dtype != torch.bfloat16 or tuple(q.shape) != (bsz, m, m)
            or tuple(scale.shape) != (bsz,)):
        raise ValueError(f"restart_gram: wants bf16 x [b, m, n] (m <= {MAX_M}), q [b, m, m] and scale [b]; got x "
                         f"{tuple(x.shape)} {x.dtype}, q {tuple(q.shape)}, scale {tuple(scale.shape)} on {x.device}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    r = torch.empty(bsz, m, m, device=x.device, dtype=torch.float16)
    xv, yv = _oriented(x, transposed), _oriented(y, transposed)
    _restart_gram_kernel[(bsz,)](
        q, scale, xv, yv, r, m, n, *q.stride(), *xv.stride(), *yv.stride(), *r.stride(), F32_DOT=_f32_dot(),
        **_launch("restart", m))
    return y, r


@restart_gram.register_fake
def _(q, scale, x, transposed):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(q)


def muon_step(g, buf, w, low, coef, mu: float, nesterov: bool, decay, step, steps: int,
              restart_at: tuple[int, ...] | None = None, eps: float = 1e-7, kernels: bool = True,
              gram_kernel: bool = True) -> None:
    """One expert tensor's Muon step in place: W <- W * decay + step * NS(U) (and its bf16 copy
    `low`), buf the momentum. The same result as `_muon_pre` + `gram_newton_schulz` + `_muon_post`
    to the order of sums. `kernels=False`: the reference functions (the test oracle);
    `gram_kernel=False`: the n x n segments by torch (`FastMuonAdamW.gram_kernel`); `restart_at`
    None: the packed path's (`optim.GRAM_RESTART_AT`)."""
    a, b, c = NS_COEFFS
    restart_at = GRAM_RESTART_AT if restart_at is None else restart_at
    transposed = w.shape[-2] > w.shape[-1]
    first = momentum_gram if kernels else momentum_gram_reference
    x, r, scale = first(g, buf, coef, mu, nesterov, transposed, eps)
    bounds = [0, *sorted({i for i in restart_at if 0 < i < steps}), steps]
    q = None
    for s0, s1 in zip(bounds, bounds[1:]):
        if q is not None:
            restart = restart_gram if kernels and CONFIGS["restart"] is not None else restart_gram_reference
            x, r = restart(q, scale, x, transposed)
            scale = torch.ones_like(scale)
        fused = kernels and gram_kernel and ns_gram.applies(r)
        seg = ns_gram.gram_segment if fused else ns_gram.gram_segment_reference
        q = seg(r, s1 - s0, a, b, c)
    # after a restart Q stays fp16: the update rounds it to bf16 as it loads it (no cast launch)
    q = (q.float() * scale[:, None, None]).to(torch.bfloat16) if s0 == 0 else q
    xo = _oriented(x, transposed)
    if kernels:
        ns_update.qx_update(w, q, xo, decay, step, transposed, low)
    else:
        ns_update.qx_update_reference(w, q, xo, decay, step, transposed)
        if low is not None:
            low.copy_(w)

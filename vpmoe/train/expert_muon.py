"""The routed experts' Muon step as streaming Triton kernels, with the Newton-Schulz restart taken
from the small side (`FastMuonAdamW`'s default on CUDA: `optim_fast.STREAM_EXPERTS`;
`stream_experts=False` keeps the packed torch path).

Per expert tensor [E, m, n] (vpMoE: 256 matrices of 128 x 1024, the up projection stored
transposed) the Gram-side Newton-Schulz runs its five quintic steps on R = U U^T (n x n = 128 x 128)
in fp16, with one restart after step 2 because half-precision Gram iterations drift from the X they
describe. The packed torch path restarts from the big side: X1 = bf16(Q1 U) and R1 = X1 X1^T, then
O = Q2 X1: ~36 bytes per parameter. Here the restart is taken on the small side, near fp32:

- `momentum_gram`: momentum, Nesterov and the bf16 U as `optim_fast._muon_pre` computes them, and
  R0 = U U^T summed over column tiles in the same program (fp32, normalised by its trace: the
  Frobenius scale). 12 bytes per parameter.
- `gram_chain` (one small program per matrix, nothing per parameter): Q1 from two fp16 steps on R0;
  R1 = Q1 R0 Q1^T with each operand split into fp16 hi + lo parts (fp32-accurate: this is what a
  restart must give, an R consistent with the Q that multiplies U); Q2 from three fp16 steps on
  R1; Q = Q2 Q1 * scale in fp32, returned as bf16 hi + lo.
- the update: `ns_update.qx_update` with Q's two parts (O = bf16(Q_hi U + Q_lo U), fp32 sums) and
  the bf16 weight copy written beside W. 12 bytes per parameter.

So 24 bytes per parameter and three launches per tensor; no X1 is written or read. It is also the
more accurate form: against a float64 iteration of the same U (bench/restart_accuracy.py, CPU,
2026-12-05) the error is 1.9e-3 against 4.1e-3 (Gaussian), 1.6e-2 against 4.6e-2 (spectrum
1..1e-5) and 1.0e-2 against 5.7e-2 (rank 4 + noise), because U meets a near-fp32 Q once
instead of a bf16 Q twice.

Design choices:
- One program per matrix in `momentum_gram` (m <= 128 rows held whole; the column loop streams the
  long side): no cross-program reduction and no atomics; a [128, 128] fp32 accumulator per
  program, so one program per SM (its loads wait on each tile's math: ~1.8-2.0 TB/s alone, where a
  plain pointwise pass reaches ~3.0; a software prefetch did not help, 2026-12-05).
- `gram_chain` reuses `ns_gram.segment` (the same fp16 roundings as `gram_segment`) and reloads R0
  from memory (L2) for the restart rather than holding it through the first segment. One program
  per matrix by default; `CONFIGS["chain"]` can give fewer programs, each taking its share of the
  matrices in turn (the same bits), so the chain's compute leaves SMs to the other streams' kernels
  (measured: no gain on an H100, 2026-12-06).
- The references (`momentum_gram_reference`, `gram_chain_reference`, `ns_update.qx_update_reference`)
  make the same roundings in torch: the test oracle under the Triton interpreter
  (tests/test_expert_muon.py) beside float64, and the path where the kernels do not apply.
- Strides are taken as given: the transposed up weights are read and written in their own layout
  (U and W share it), so no transposed copies.
- Custom ops (capturable in CUDA graphs: fixed grids for fixed shapes); `muon_step` runs the chain
  for one tensor and applies where the kernels do (`applies`: CUDA or the interpreter, bf16
  Newton-Schulz, fp32 weights, m <= 128).
"""
from __future__ import annotations

import torch

from vpmoe.model.router_fused import (
    _f32_dot,  # the interpreter multiplies in fp32 (same products)
    split_hi_lo,
)
from vpmoe.model.tpa_fused import available, interpreting
from vpmoe.train import ns_update
from vpmoe.train.ns_gram import bmm_f32, gram_segment_reference
from vpmoe.train.optim import GRAM_RESTART_AT, NS_COEFFS

try:
    import triton
    import triton.language as tl

    from vpmoe.model.router_fused import _round_bf16
    from vpmoe.train.ns_gram import _dot16, segment
except ImportError:  # CPU-only installs: the packed torch path
    triton = None

MAX_M = 128  # the short side held whole per program
# `momentum_gram`'s (columns per tile, warps, pipeline stages, register cap or 0 for the compiler's
# choice) at 128 rows: the [128, 128] fp32
# accumulator is 64 registers a thread at 8 warps (at 16 warps and 3 stages 112 registers in all, no
# spills, as a launch compiles it: bench/kernel_registers.py, Triton 3.9). 64 columns at 16 warps timed fastest on an H100
# (2026-12-05 20:20 and 21:32, bench/expert_muon.py, which times the alternatives), and in the
# 20-layer optimizer step against 128 columns and 32 columns x 32 warps (H100, 2026-12-06 00:28-00:38).
# 3 stages, not 2: at 2 Triton pipelines the loads through one shared-memory buffer, so the next
# tile's copy waits for this tile's math; 3 give two buffers (148 -> 131 us a launch in the 20-layer
# optimizer step, H200, 2026-12-06 03:11). A cap of 128 registers at 8 warps and 32 columns (no
# spills, 64 KiB of shared memory at 3 stages) lets two programs share an SM, so all 256 matrices
# run in one wave: not ahead (20-layer optimizer step 24.25 / 23.99 ms at 3 / 4 stages against
# 24.05, H100, 2026-12-06 06:05; bench `mregs`), nor were 4 stages or 32 columns x 4 (05:46)
# `gram_chain`'s (programs, 0 for one per matrix): the chain is compute on the tensor cores at one
# program per SM (~255 registers at 8 warps), so at one program per matrix it holds every SM for
# its ~56 us a launch while the other streams' bandwidth-bound kernels wait for SMs; fewer programs,
# each taking its share of the matrices in turn, leave the rest of the SMs to them. Opt-in: not
# ahead (20-layer optimizer step 26.53 / 24.42 / 23.74 ms at 16 / 32 / 64 programs against 23.67
# per matrix, H100, 2026-12-06 11:57; bench `cprogs=N`); its loop spills 652 bytes at 8 warps (120)
CONFIGS = {"momentum": (64, 16, 3, 0), "chain": (0,)}
DEFAULT_CONFIGS = dict(CONFIGS)  # for benchmarks that set others per run


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [b, m, n] view Newton-Schulz iterates on (m the short side)."""
    return t.mT if transposed else t


def normalised_gram(u: torch.Tensor, transposed: bool, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """R = U U^T of the bf16 U (fp32 sums) and the scale 1 / (||U|| + eps) from its trace; returns
    (R * scale^2 in fp32, scale): `momentum_gram`'s second half in torch."""
    # here, not at the top: optim_fast imports this module
    from vpmoe.train.optim_fast import gram_scale
    x = _oriented(u, transposed)
    r = bmm_f32(x, x.mT)
    scale = gram_scale(r, eps)
    return r * scale[:, None, None] ** 2, scale


def momentum_gram_reference(g, buf, coef, mu: float, nesterov: bool, transposed: bool, eps: float = 1e-7):
    """U = `_muon_pre` (buf updated in place), then `normalised_gram`; returns (U, R, scale)."""
    from vpmoe.train.optim_fast import _muon_pre
    u = _muon_pre(g, buf, coef, mu, nesterov, torch.bfloat16)
    return u, *normalised_gram(u, transposed, eps)


def gram_chain_reference(r0, scale, steps1: int, steps2: int, a: float, b: float, c: float):
    """Q = Q2 Q1 * scale as bf16 (hi, lo): Q1 from `steps1` fp16 steps on R0 (fp32 [b, m, m],
    normalised), then (if steps2) R1 = Q1 R0 Q1^T from fp16 hi/lo parts with fp32 sums, Q2 from
    `steps2` fp16 steps on it; `gram_chain`'s roundings in torch."""
    q = gram_segment_reference(r0.half(), steps1, a, b, c)
    if steps2:
        t = sum(bmm_f32(q, part) for part in split_hi_lo(r0, torch.float16))
        r1 = sum(bmm_f32(part, q.mT) for part in split_hi_lo(t, torch.float16)).half()
        q = bmm_f32(gram_segment_reference(r1, steps2, a, b, c), q)
    return split_hi_lo(q.float() * scale[:, None, None])


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
                              BN: tl.constexpr, F32_DOT: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BM)
        row_ok = rows < M
        coef = tl.load(coef_ptr)
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            ok = row_ok[:, None] & (cols < N)[None, :]
            g = tl.load(g_ptr + b * sg_b + rows[:, None] * sg_m + cols[None, :] * sg_n, mask=ok, other=0.0)
            g = g.to(tl.float32) * coef
            bp = buf_ptr + b * sb_b + rows[:, None] * sb_m + cols[None, :] * sb_n
            m = tl.load(bp, mask=ok, other=0.0).to(tl.float32) * mu + g
            if BUF_BF16:
                tl.store(bp, _round_bf16(m).to(tl.bfloat16), mask=ok)
            else:
                tl.store(bp, m, mask=ok)
            if NESTEROV:
                u = _round_bf16(g + mu * m)
            else:
                u = _round_bf16(m)
            tl.store(u_ptr + b * su_b + rows[:, None] * su_m + cols[None, :] * su_n, u.to(tl.bfloat16), mask=ok)
            acc += _dot(u, tl.trans(u), F32_DOT)
        trace = tl.sum(tl.sum(tl.where(rows[:, None] == rows[None, :], acc, 0.0), axis=1), axis=0)
        scale = 1.0 / (tl.sqrt(tl.maximum(trace, 0.0)) + eps)
        tl.store(r_ptr + b * sr_b + rows[:, None] * sr_m + rows[None, :] * sr_n, acc * (scale * scale),
                 mask=row_ok[:, None] & row_ok[None, :])
        tl.store(scale_ptr + b, scale)

    @triton.jit
    def _split16(t):
        """fp32 t -> fp16 (hi, lo), t ~ hi + lo."""
        hi = t.to(tl.float16)
        return hi, (t - hi.to(tl.float32)).to(tl.float16)

    @triton.jit
    def _chain_one(pid, r_ptr, scale_ptr, hi_ptr, lo_ptr, N, sr_b, sr_m, sr_n, so_b, so_m, so_n, a, b, c,
                   STEPS1: tl.constexpr, STEPS2: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr):
        """Matrix `pid`'s chain: Q1 from R0, the restart R1 = Q1 R0 Q1^T, Q = Q2 Q1 * scale as bf16 hi + lo."""
        idx = tl.arange(0, BN)
        ok = (idx < N)[:, None] & (idx < N)[None, :]
        r_tile = r_ptr + pid * sr_b + idx[:, None] * sr_m + idx[None, :] * sr_n
        a_eye = tl.where(idx[:, None] == idx[None, :], a, 0.0)
        q = segment(tl.load(r_tile, mask=ok, other=0.0).to(tl.float16), a_eye, b, c, STEPS1, F32_DOT)
        if STEPS2 > 0:  # the restart: R1 = Q1 R0 Q1^T from fp16 hi/lo parts, fp32 sums
            r0_hi, r0_lo = _split16(tl.load(r_tile, mask=ok, other=0.0))
            t = _dot16(q, r0_hi, F32_DOT) + _dot16(q, r0_lo, F32_DOT)
            t_hi, t_lo = _split16(t)
            q_t = tl.trans(q)
            r1 = (_dot16(t_hi, q_t, F32_DOT) + _dot16(t_lo, q_t, F32_DOT)).to(tl.float16)
            q = _dot16(segment(r1, a_eye, b, c, STEPS2, F32_DOT), q, F32_DOT)
        qs = q.to(tl.float32) * tl.load(scale_ptr + pid)
        hi = _round_bf16(qs)
        out = pid * so_b + idx[:, None] * so_m + idx[None, :] * so_n
        tl.store(hi_ptr + out, hi.to(tl.bfloat16), mask=ok)
        tl.store(lo_ptr + out, _round_bf16(qs - hi).to(tl.bfloat16), mask=ok)

    @triton.jit
    def _chain_kernel(r_ptr, scale_ptr, hi_ptr, lo_ptr, B, N, sr_b, sr_m, sr_n, so_b, so_m, so_n, a, b, c,
                      STEPS1: tl.constexpr, STEPS2: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr,
                      SHARED: tl.constexpr):
        # one matrix per program; SHARED (fewer programs than matrices: CONFIGS["chain"]): each program
        # takes its share in turn, leaving the other SMs to the bandwidth-bound kernels beside it (the
        # loop costs registers: 652 bytes of spills at 8 warps against 120, bench/kernel_registers.py)
        pid = tl.program_id(0).to(tl.int64)
        if SHARED:
            while pid < B:
                _chain_one(pid, r_ptr, scale_ptr, hi_ptr, lo_ptr, N, sr_b, sr_m, sr_n, so_b, so_m, so_n, a, b, c,
                           STEPS1, STEPS2, BN, F32_DOT)
                pid += tl.num_programs(0)
        else:
            _chain_one(pid, r_ptr, scale_ptr, hi_ptr, lo_ptr, N, sr_b, sr_m, sr_n, so_b, so_m, so_n, a, b, c,
                       STEPS1, STEPS2, BN, F32_DOT)


def applies(device: torch.device, w_dtype: torch.dtype, m: int) -> bool:
    """Whether the kernels serve an expert tensor on `device` with weights in `w_dtype` and short
    side m (bf16 Newton-Schulz is the caller's: `FastMuonAdamW` on CUDA)."""
    return (triton is not None and available(device) and w_dtype == torch.float32 and m <= MAX_M)


@torch.library.custom_op("vpmoe::momentum_gram", mutates_args=("buf",))
def momentum_gram(g: torch.Tensor, buf: torch.Tensor, coef: torch.Tensor, mu: float, nesterov: bool,
                  transposed: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`momentum_gram_reference` in one launch: g (any float dtype) and buf (fp32 or bf16) [b, m, n]
    (or [b, n, m] when `transposed`), coef a 0-dim fp32 device tensor; returns U (bf16, g's layout),
    R (fp32 [b, m, m], normalised) and the scale (fp32 [b])."""
    bsz = g.shape[0]
    m, n = (g.shape[2], g.shape[1]) if transposed else (g.shape[1], g.shape[2])
    if not applies(g.device, torch.float32, m) or buf.shape != g.shape or buf.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"momentum_gram: wants g and buf (fp32 or bf16) of one shape [b, m, n] with m <= {MAX_M} "
                         f"on CUDA; got g {tuple(g.shape)} {g.dtype}, buf {tuple(buf.shape)} {buf.dtype} on {g.device}")
    u = torch.empty_like(g, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
    r = torch.empty(bsz, m, m, device=g.device, dtype=torch.float32)
    scale = torch.empty(bsz, device=g.device, dtype=torch.float32)
    gv, bv, uv = (_oriented(t, transposed) for t in (g, buf, u))
    bn, warps, stages, max_regs = CONFIGS["momentum"]
    cap = {"maxnreg": max_regs} if max_regs and not interpreting() else {}
    _momentum_gram_kernel[(bsz,)](
        gv, bv, uv, r, scale, coef, m, n, float(mu), float(eps), *gv.stride(), *bv.stride(), *uv.stride(),
        *r.stride(), NESTEROV=bool(nesterov), BUF_BF16=buf.dtype == torch.bfloat16, F32_DOT=_f32_dot(),
        BM=max(16, triton.next_power_of_2(m)), BN=16 if interpreting() else bn, num_warps=warps, num_stages=stages,
        **cap)
    return u, r, scale


@momentum_gram.register_fake
def _(g, buf, coef, mu, nesterov, transposed, eps):
    m = g.shape[2] if transposed else g.shape[1]
    return (torch.empty_like(g, dtype=torch.bfloat16, memory_format=torch.contiguous_format),
            g.new_empty(g.shape[0], m, m, dtype=torch.float32), g.new_empty(g.shape[0], dtype=torch.float32))


@torch.library.custom_op("vpmoe::gram_chain", mutates_args=())
def gram_chain(r0: torch.Tensor, scale: torch.Tensor, steps1: int, steps2: int, a: float, b: float,
               c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`gram_chain_reference` in one launch: r0 fp32 [b, m, m] (m <= 128), scale fp32 [b]."""
    bsz, m = r0.shape[0], r0.shape[-1]
    if (triton is None or not available(r0.device) or r0.dtype != torch.float32 or r0.ndim != 3
            or r0.shape[1] != m or m > MAX_M or tuple(scale.shape) != (bsz,) or steps1 < 1 or steps2 < 0):
        raise ValueError(f"gram_chain: wants fp32 r0 [b, m, m] (m <= {MAX_M}) and scale [b] on CUDA, steps1 >= 1, "
                         f"steps2 >= 0; got r0 {tuple(r0.shape)} {r0.dtype}, scale {tuple(scale.shape)} on "
                         f"{r0.device}, steps {steps1}, {steps2}")
    hi = torch.empty(bsz, m, m, device=r0.device, dtype=torch.bfloat16)
    lo = torch.empty_like(hi)
    programs = min(CONFIGS["chain"][0] or bsz, bsz)
    _chain_kernel[(programs,)](r0, scale, hi, lo, bsz, m, *r0.stride(), *hi.stride(), float(a), float(b), float(c),
                               STEPS1=steps1, STEPS2=steps2, BN=max(16, triton.next_power_of_2(m)), F32_DOT=_f32_dot(),
                               SHARED=programs < bsz, num_warps=8)
    return hi, lo


@gram_chain.register_fake
def _(r0, scale, steps1, steps2, a, b, c):
    return torch.empty_like(r0, dtype=torch.bfloat16), torch.empty_like(r0, dtype=torch.bfloat16)


def muon_step(g, buf, w, low, coef, mu: float, nesterov: bool, decay, step, steps: int,
              restart_at: tuple[int, ...] | None = None, eps: float = 1e-7, kernels: bool = True,
              gram_kernel: bool = True) -> None:
    """One expert tensor's Muon step in place: W <- W * decay + step * NS(U) (and its bf16 copy
    `low`), buf the momentum. `kernels=False`: the reference functions (the test oracle);
    `gram_kernel=False`: the n x n chain by torch (`FastMuonAdamW.gram_kernel`); `restart_at`
    None: `optim.GRAM_RESTART_AT` (at most one restart)."""
    a, b, c = NS_COEFFS
    cuts = sorted({i for i in (GRAM_RESTART_AT if restart_at is None else restart_at) if 0 < i < steps})
    if len(cuts) > 1:
        raise ValueError(f"expert_muon.muon_step: at most one restart, got {cuts} (optim.GRAM_RESTART_AT)")
    steps1 = cuts[0] if cuts else steps
    transposed = w.shape[-2] > w.shape[-1]
    u, r0, scale = (momentum_gram if kernels else momentum_gram_reference)(g, buf, coef, mu, nesterov, transposed, eps)
    chain = gram_chain if kernels and gram_kernel else gram_chain_reference
    q_hi, q_lo = chain(r0, scale, steps1, steps - steps1, a, b, c)
    uo = _oriented(u, transposed)
    if kernels:
        ns_update.qx_update(w, q_hi, uo, decay, step, transposed, low, q_lo)
    else:
        ns_update.qx_update_reference(w, q_hi, uo, decay, step, transposed, q_lo)
        if low is not None:
            low.copy_(w)

"""The experts' weight gradients as one Triton kernel: dW[e] = sum over e's sorted rows of A'^T B'.

A grouped GEMM's weight gradient with the rows sorted by expert (`order`, group ends `offsets`):
    dW[e] = sum_r A'[r]^T B'[r],   db[e] = sum_r B'[r]
where either operand may be read through the sort order (a gathered token row, never
materialised), squared-ReLU'd on load, or scaled per row by the routing weight. Used by the
grouped-GEMM path (`kernels._GatherGemm`, `kernels._DownSum` through `gathered_wgrad`, the default
where Triton serves) and by the fused MoE kernels' backward (`moe_fused`).

Design choices:
- One program per (expert, output tile) loops over the expert's rows and writes fp32 (the master
  weights' gradient dtype): no bf16 product rounded and cast again, no atomics, every output
  element written once (deterministic; the autotuner's repeated runs are harmless).
- Memory-bound by design at d = 1024, width 128 (~114 FLOP per byte): the tile configurations
  (`WGRAD_CONFIGS`) favour short pipelines and fp32 stores.
- Sums of squares (`sq`): each program also writes its tile's sum of squares into a buffer whose
  shape does not depend on the tiling (`sq_shape`), so the optimizer's clipping norm need not read
  dW again (`FastBody.grad_sq`).
- No row splitting: cutting a busy expert's rows into parts (a workspace and an in-order fix-up
  kernel) was built and timed on 2026-12-04 and was slower alone under balanced and skewed routing
  alike (docs/performance.md, what was tried).
- Busiest experts first (`busiest`, from `busiest_first`): the grid is flat, each expert's tiles
  consecutive, and the experts taken in decreasing row count, so the longest row loops start in the
  first wave rather than the last (longest-processing-time-first; at init the busiest expert has
  ~11x the mean rows). The same programs in another order: the result is bit-identical.
- The bias gradient db[e] = sum_r B'[r]: one more row of tiles per expert in the weight-gradient
  grid (`_bias_tile`: those programs sum B' alone, no product), taken busiest first with the
  expert's other tiles. Summed inside every dW program (until 2026-12-07) it cost the up gradient
  8-38 us of ~107 at (a)'s shape (all but the first row tile threw the sum away); as a launch of its
  own (55b75c6 to 2026-12-07) it took 83 us a launch inside the (a) step, the busiest expert's one
  program looping over ~11x the mean rows alone at init routing. As tiles: the (a) step 54.36/54.43
  ms against 55.97/56.07 with the launch (H100, interleaved, 2026-12-07 09:33).
- Offsets are int32 (`wgrad_applies` refuses more than 2^31 elements per operand).
- Tests: tests/test_moe_fused.py (the Triton interpreter against float64, `check_gathered_wgrad`,
  `check_grad_sq`); on the GPU, tests/gpu/test_gpu_moe_fused.py.
"""
from __future__ import annotations

import torch

# the same test for every Triton op
from vpmoe.model.tpa_fused import autotuned, available, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the grouped GEMMs
    triton = None

# the weight gradient is bound by latency and its fp32 stores (a short row loop per expert): fewer stages
# leave shared memory for more resident programs. Alone at (a)'s shapes on H200s (2026-12-04, the up
# gradient, two machines, balanced and skewed routing, us): (64, 128, 64, 4, 2) 74-144, (64, 128, 64, 4, 4)
# 118-146, (128, 128, 64, 8, 3) 86-163. The deeper-pipelined ones stay for long row loops (the 80-layer
# step's 65k-token micro-batches, not re-timed): the autotuner picks per shape.
WGRAD_CONFIGS = [(64, 128, 64, 4, 2), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4), (128, 128, 32, 4, 5),
                 (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
# the granularity of the weight gradient's sums of squares (`sq_shape`): every BM and BN is a multiple
SQ_TILE = 16


def sq_shape(E: int, KA: int, NB: int) -> tuple[int, int, int]:
    """The shape of `_wgrad_kernel`'s sums of squares for dW [E, KA, NB]: one SQ_TILE-square slot each."""
    return E, -(-KA // SQ_TILE), -(-NB // SQ_TILE)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# kernels

if triton is not None:
    INTERPRETING = tl.constexpr(interpreting())

    @triton.jit
    def tile_dot(a, b, acc, FP32: tl.constexpr):
        """acc + a @ b: exact fp32 products for fp32 models (tests), else bf16 tensor cores. The
        interpreter's bf16 dot is wrong (numpy has no bf16): there the bf16-rounded operands are
        multiplied in fp32, the same products."""
        if FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        if INTERPRETING:
            return tl.dot(bf16_rounded(a.to(tl.float32)), bf16_rounded(b.to(tl.float32)), acc,
                          input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)

    @triton.jit
    def bf16_rounded(x):
        """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32: for the interpreter, whose
        own fp32 -> bf16 conversion truncates (a 1-ulp bias; the GPU's rounds to nearest)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _wgrad_kernel(a_ptr, stride_a, b_ptr, stride_b, order_ptr, scale_ptr, offsets_ptr, busiest_ptr, dw_ptr,
                      db_ptr, sq_ptr, KA, NB, M, TOPK: tl.constexpr, BUSIEST: tl.constexpr, GATHER_A: tl.constexpr,
                      ACT_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_B: tl.constexpr, HAS_DB: tl.constexpr,
                      HAS_SQ: tl.constexpr, SQ: tl.constexpr, FP32: tl.constexpr, LOW: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
        """dW[e] [KA, NB] = sum over expert e's sorted rows r of A'[r]^T B'[r], and with HAS_DB the bias
        gradient db[e] [NB] = sum_r B'[r] (fp32). A'[r] = A[order[r] // TOPK] (GATHER_A) or A[r],
        squared-ReLU'd (ACT_A); B'[r] likewise gathered (GATHER_B) and times scale[order[r]] (SCALE_B). One
        program per (expert, tile) on a flat grid, an expert's tiles consecutive; with HAS_DB each expert has
        one more row of tiles, whose programs sum B' for db (`_bias_tile`). BUSIEST: the experts in the order
        busiest_ptr lists them (`busiest_first`), else in id order. M (all experts' rows) is only the
        autotuning key. HAS_SQ: each dW program also writes its tile's sum of squares into sq [E, cdiv(KA, SQ),
        cdiv(NB, SQ)] (`sq_shape`, SQ = SQ_TILE): in the first SQ-square slot it covers, zeros in its other
        slots, so the buffer's shape and sum do not depend on the tiling the autotuner picks and no slot is
        left unwritten. LOW: dW is bf16, rounded to nearest here (the interpreter's own conversion truncates),
        and the sums of squares are the rounded values', so they are exactly the stored gradient's."""
        tiles_n = tl.cdiv(NB, BN)
        tiles_m = tl.cdiv(KA, BM)
        tiles = (tiles_m + (1 if HAS_DB else 0)) * tiles_n
        pid = tl.program_id(0)
        e = pid // tiles
        if BUSIEST:
            e = tl.load(busiest_ptr + e)
        tile_m, tile_n = (pid % tiles) // tiles_n, pid % tiles_n
        start, end = _expert_span(offsets_ptr, e)
        ns = tile_n * BN + tl.arange(0, BN)
        n_ok = ns < NB
        if HAS_DB and tile_m == tiles_m:  # the bias tile (without HAS_DB this branch is not compiled)
            _bias_tile(b_ptr, stride_b, order_ptr, scale_ptr, db_ptr, e, start, end, ns, n_ok, NB, TOPK, GATHER_B,
                       SCALE_B, BN, BK)
        else:
            ms = tile_m * BM + tl.arange(0, BM)
            m_ok = ms < KA
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for r0 in range(start, end, BK):
                rows = r0 + tl.arange(0, BK)
                ok = rows < end
                flat = tl.load(order_ptr + rows, mask=ok, other=0).to(tl.int32)
                a_rows = (flat // TOPK) if GATHER_A else rows
                a = tl.load(a_ptr + a_rows[:, None] * stride_a + ms[None, :], mask=ok[:, None] & m_ok[None, :],
                            other=0.0)
                if ACT_A:
                    r = tl.maximum(a.to(tl.float32), 0.0)
                    a = r * r
                b = _b_rows(b_ptr, stride_b, scale_ptr, flat, rows, ok, ns, n_ok, TOPK, GATHER_B, SCALE_B)
                acc = tile_dot(tl.trans(a), b, acc, FP32)
            if LOW:
                acc = bf16_rounded(acc)
            tl.store(dw_ptr + e * KA * NB + ms[:, None] * NB + ns[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
            if HAS_SQ:
                _store_sq(sq_ptr, e, tile_m, tile_n, acc, KA, NB, SQ, BM, BN)

    @triton.jit
    def _expert_span(offsets_ptr, e):
        """(first, end) of expert e's sorted rows, from the group ends `offsets`."""
        return tl.load(offsets_ptr + e - 1, mask=e > 0, other=0), tl.load(offsets_ptr + e)

    @triton.jit
    def _b_rows(b_ptr, stride_b, scale_ptr, flat, rows, ok, ns, n_ok, TOPK: tl.constexpr, GATHER_B: tl.constexpr,
                SCALE_B: tl.constexpr):
        """B' for a row tile of sorted rows `rows` (`flat`: their order entries): B's rows, or the rows
        order // TOPK where GATHER_B (zeros where not `ok`), times scale[flat] where SCALE_B."""
        b_rows = (flat // TOPK) if GATHER_B else rows
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + ns[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE_B:
            b = b.to(tl.float32) * tl.load(scale_ptr + flat, mask=ok, other=0.0).to(tl.float32)[:, None]
        return b

    @triton.jit
    def _bias_tile(b_ptr, stride_b, order_ptr, scale_ptr, db_ptr, e, start, end, ns, n_ok, NB, TOPK: tl.constexpr,
                   GATHER_B: tl.constexpr, SCALE_B: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """db[e, ns] = sum over expert e's sorted rows r of B'[r] (B' as `_wgrad_kernel` reads it), fp32."""
        db = tl.zeros([BN], dtype=tl.float32)
        for r0 in range(start, end, BK):
            rows = r0 + tl.arange(0, BK)
            ok = rows < end
            flat = rows
            if GATHER_B or SCALE_B:  # the up gradient's B (not gathered, not scaled) needs no order
                flat = tl.load(order_ptr + rows, mask=ok, other=0).to(tl.int32)
            b = _b_rows(b_ptr, stride_b, scale_ptr, flat, rows, ok, ns, n_ok, TOPK, GATHER_B, SCALE_B)
            db += tl.sum(b.to(tl.float32), 0)
        tl.store(db_ptr + e * NB + ns, db, mask=n_ok)

    @triton.jit
    def _store_sq(sq_ptr, e, tile_m, tile_n, acc, KA, NB, SQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """The tile's sum of squares in the first SQ-square slot it covers, zeros in its others
        (`sq_shape`); masked loads left zeros outside the weight, so acc's squares are the tile's own."""
        total = tl.sum(tl.sum(acc * acc, 1), 0)
        g1, g2 = (KA + SQ - 1) // SQ, (NB + SQ - 1) // SQ
        j1, j2 = tl.arange(0, BM // SQ), tl.arange(0, BN // SQ)
        s1, s2 = tile_m * (BM // SQ) + j1, tile_n * (BN // SQ) + j2
        first = (j1 == 0)[:, None] & (j2 == 0)[None, :]
        tl.store(sq_ptr + e * g1 * g2 + s1[:, None] * g2 + s2[None, :], tl.where(first, total, 0.0),
                 mask=(s1 < g1)[:, None] & (s2 < g2)[None, :])


# ----------------------------------------------------------------------------------------------
# launches

_WGRAD_KEY = ["KA", "NB", "M", "GATHER_A", "ACT_A", "GATHER_B", "SCALE_B", "HAS_DB", "FP32", "LOW", "BUSIEST"]
_kernel = None


def _tuned():
    """The kernel, autotuned per shape and flags on CUDA; the interpreter runs small tiles
    (`_untuned_config`) so that tests cross tile and expert boundaries."""
    global _kernel
    if _kernel is None:
        _kernel = autotuned(_wgrad_kernel, WGRAD_CONFIGS, _WGRAD_KEY)
    return _kernel


def _untuned_config() -> dict:
    return {"BM": 16, "BN": 16, "BK": 16} if interpreting() else {}


def busiest_first(offsets: torch.Tensor) -> torch.Tensor:
    """The expert ids int32 in decreasing order of their row counts (ties by id), from the group ends
    `offsets` [E]: the order `_wgrad_kernel` takes them in (`busiest`). On the device, no sync."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def launch(a, b, order, offsets, dw, db, topk: int, fp32: bool, *, gather_a=False, act=False, gather_b=False,
           scale=None, config=None, sq=None, busiest=None):
    """`_wgrad_kernel` autotuned, or with `config` = (BM, BN, BK, warps, stages) at that tiling
    (bench/wgrad.py times each configuration); `sq` [`sq_shape`]: the tiles' sums of squares too;
    `busiest` [E] int32 (`busiest_first`): the experts' order, busiest first (else by id).
    dw fp32 or bf16 (then rounded to nearest in the kernel)."""
    E, KA, NB = dw.shape
    M = order.numel()
    if sq is not None and tuple(sq.shape) != sq_shape(E, KA, NB):
        raise ValueError(f"wgrad.launch: sq has shape {tuple(sq.shape)}, dW {tuple(dw.shape)} needs {sq_shape(E, KA, NB)}")
    if busiest is not None and (tuple(busiest.shape) != (E,) or busiest.dtype != torch.int32):
        # the kernel reads E entries through it: a shorter or wider one would read past its end
        raise ValueError(f"wgrad.launch: busiest is {busiest.dtype} {tuple(busiest.shape)}, dW {tuple(dw.shape)} needs "
                         f"int32 ({E},) (wgrad.busiest_first)")
    if config is None:
        kernel, meta = _tuned(), _untuned_config()
    else:
        bm, bn, bk, warps, stages = config
        kernel, meta = _wgrad_kernel, {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
    has_db = db is not None
    kernel[lambda m: (E * (triton.cdiv(KA, m["BM"]) + has_db) * triton.cdiv(NB, m["BN"]),)](
        a, a.stride(0), b, b.stride(0), order, dw if scale is None else scale, offsets,
        offsets if busiest is None else busiest, dw, db if has_db else dw, dw if sq is None else sq, KA, NB,
        M=M, TOPK=topk, BUSIEST=busiest is not None, GATHER_A=gather_a, ACT_A=act, GATHER_B=gather_b,
        SCALE_B=scale is not None, HAS_DB=has_db, HAS_SQ=sq is not None, SQ=SQ_TILE, FP32=fp32,
        LOW=dw.dtype != torch.float32, **meta)


def wgrad_applies(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> bool:
    """Whether `gathered_wgrad` serves these operands: Triton on their device, bf16 or fp32, and every
    offset the kernel forms within int32."""
    return (available(a.device) and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float32)
            and max(a.numel(), b.numel(), n_experts * a.shape[1] * b.shape[1]) < 2**31)


@torch.library.custom_op("vpmoe::gathered_wgrad", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def gathered_wgrad(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, gather_a: bool,
                   bias: bool, sq: bool = False, low: bool = False,
                   busiest: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight gradient of a grouped GEMM whose rows are sorted by expert, in fp32 (or bf16), straight from
    `_wgrad_kernel`: dW[e] = sum over e's rows r of A'[r]^T B'[r], where the operand named by
    `gather_a` is read through `index` (A'[r] = A[index[r]], else B'[r] = B[index[r]]), so neither
    gathered operand is materialised; with `bias`, db[e] = sum_r B'[r] too (else db is empty); with
    `sq`, partial sums of dW's squares [`sq_shape`] whose total is ||dW||^2 (else empty): taken from
    the kernel's registers, so the optimizer's clipping norm need not read dW again. With `low`,
    dW is in the operands' dtype (bf16: the gradients `grad_holder`s take, `FastBody.use_low_grads`),
    rounded to nearest from the fp32 sums, and the sums of squares are of the rounded values.
    `busiest` (optional, `busiest_first(offsets)`): the programs take the experts busiest first.
    The grouped-GEMM path's form (`kernels._GatherGemm`, `kernels._DownSum`) wrote a bf16
    gradient (and for the up GEMM first gathered its rows with a ones column), which the
    compiled backward then cast to fp32 for the master weight: three passes where this is one."""
    a, b = a.contiguous(), b.contiguous()
    dw, db, sq_parts = _wgrad_outputs(a, b, offsets, bias, sq, low)
    launch(a, b, index, offsets, dw, db if bias else None, 1, a.dtype == torch.float32, gather_a=gather_a,
           gather_b=not gather_a, sq=sq_parts if sq else None, busiest=busiest)
    return dw, db, sq_parts


def _wgrad_outputs(a, b, offsets, bias: bool, sq: bool, low: bool = False):
    E, KA, NB = offsets.shape[0], a.shape[1], b.shape[1]
    return (a.new_empty(E, KA, NB, dtype=a.dtype if low else torch.float32),
            a.new_empty(E if bias else 0, NB, dtype=torch.float32),
            a.new_empty(sq_shape(E, KA, NB) if sq else (0,), dtype=torch.float32))


@gathered_wgrad.register_fake
def _(a, b, index, offsets, gather_a, bias, sq=False, low=False, busiest=None):
    return _wgrad_outputs(a, b, offsets, bias, sq, low)


def route_weight_grads(ctx, g_w: torch.Tensor, g_sq):
    """(master's gradient, probe's gradient, holder's gradient) for `kernels._GatherGemm` and
    `_DownSum`: the weight gradient all to the holder, in its dtype, when one takes it
    (`ctx.low_grad`, `takes_grad`), else to the master in its own dtype; the kernel's sums of squares
    `g_sq` to the probe where they are the stored gradient's (an fp32 master's, or the holder's)."""
    probe = g_sq if ctx.probe and (ctx.w_dtype == torch.float32 or ctx.low_grad) else None
    if ctx.low_grad:
        return None, probe, g_w.to(ctx.low_dtype)
    return g_w.to(ctx.w_dtype), probe, None


def grad_holder(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A leaf of w's shape that takes w's gradient in `dtype` from `routed_experts(grad_to=...)`
    (the master w then gets none). Its values are never read: one element in memory, every stride
    0; autograd gives it a contiguous gradient and adds later backwards' into that in place."""
    return torch.zeros((), dtype=dtype, device=w.device).expand(w.shape).detach().requires_grad_()


def takes_grad(ctx, holder, index: int) -> bool:
    """Whether the holder argument at `index` takes the weight gradient (and notes its dtype)."""
    ctx.low_dtype = None if holder is None else holder.dtype
    return holder is not None and ctx.needs_input_grad[index]

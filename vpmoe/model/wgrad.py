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
- Row splitting (`split`, opt-in: `WGRAD_SPLIT`): the kernel's time is its busiest expert's row
  loop. With a skewed router an expert with more than `split` rows is cut into near-equal parts,
  one program each (the work units are mapped to (expert, part) inside the kernel from the group
  ends: a fixed grid, no host sync, CUDA-graph capturable); parts 1.. go to a workspace and a
  fix-up kernel adds them to dW in part order (deterministic) and writes that expert's squares.
- Offsets are int32 (`wgrad_applies` refuses more than 2^31 elements per operand).
- Tests: tests/test_moe_fused.py (the Triton interpreter against float64, `check_gathered_wgrad`,
  `check_grad_sq`, `check_wgrad_split`); on the GPU, tests/gpu/test_gpu_moe_fused.py.
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
    def _expert_parts(offsets_ptr, E, E_P2: tl.constexpr, SPLIT: tl.constexpr):
        """(expert index vector [E_P2], each expert's first row, its group end, its parts n_i =
        max(1, cdiv(rows_i, SPLIT)); 0 parts past E), from the group ends."""
        es = tl.arange(0, E_P2)
        ends = tl.load(offsets_ptr + es, mask=es < E, other=0)
        starts = tl.load(offsets_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
        return es, starts, ends, tl.where(es < E, tl.maximum((ends - starts + SPLIT - 1) // SPLIT, 1), 0)

    @triton.jit
    def _expert_splits(e, offsets_ptr, E, E_P2: tl.constexpr, SPLIT: tl.constexpr):
        """Row splitting of the weight gradient (`wgrad_split`): expert i's rows are cut into
        n_i = max(1, cdiv(rows_i, SPLIT)) near-equal parts, one program (work unit) each, in expert
        order. For work unit `e`: (expert, part, the expert's n, the part's first row, its end, the
        expert's first workspace slot); the workspace holds parts 1..n-1 of every split expert in
        expert order (part 0 goes to dW itself). Units past the last get expert >= E."""
        es, starts, ends, parts = _expert_parts(offsets_ptr, E, E_P2, SPLIT)
        cum = tl.cumsum(parts, 0)
        expert = tl.sum((cum <= e).to(tl.int32), 0)
        pick = es == expert
        n = tl.sum(tl.where(pick, parts, 0), 0)
        first_unit = tl.sum(tl.where(pick, cum - parts, 0), 0)
        start, end = tl.sum(tl.where(pick, starts, 0), 0), tl.sum(tl.where(pick, ends, 0), 0)
        part = e - first_unit
        per = (end - start + n - 1) // tl.maximum(n, 1)
        row0 = start + part * per
        return expert, part, n, row0, tl.minimum(end, row0 + per), first_unit - expert

    @triton.jit
    def _wgrad_kernel(a_ptr, stride_a, b_ptr, stride_b, order_ptr, scale_ptr, offsets_ptr, dw_ptr, db_ptr, sq_ptr,
                      ws_ptr, dbws_ptr, E, KA, NB, M, TOPK: tl.constexpr, GATHER_A: tl.constexpr, ACT_A: tl.constexpr,
                      GATHER_B: tl.constexpr, SCALE_B: tl.constexpr, HAS_DB: tl.constexpr, HAS_SQ: tl.constexpr, SQ: tl.constexpr,
                      SPLIT: tl.constexpr, E_P2: tl.constexpr,
                      FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """dW[e] [KA, NB] = sum over expert e's sorted rows r of A'[r]^T B'[r]; db[e] = sum_r B'[r].
        A'[r] = A[order[r] // TOPK] (GATHER_A) or A[r], squared-ReLU'd (ACT_A); B'[r] likewise
        gathered (GATHER_B) and times scale[order[r]] (SCALE_B). One program per (expert, tile). M (all
        experts' rows) is only the autotuning key. HAS_SQ: each program also writes its tile's sum
        of squares into sq [E, cdiv(KA, SQ), cdiv(NB, SQ)] (`sq_shape`, SQ = SQ_TILE): in the first
        SQ-square slot it covers, zeros in its other slots, so the buffer's shape and sum do
        not depend on the tiling the autotuner picks and no slot is left unwritten. SPLIT > 0: one
        program per part of an expert's rows (`_expert_splits`), parts 1.. into the workspace (ws,
        dbws), summed into dW by `_wgrad_fixup_kernel`, which also writes a split expert's squares."""
        if SPLIT > 0:
            e, part, n, start, end, slot0 = _expert_splits(tl.program_id(0), offsets_ptr, E, E_P2, SPLIT)
            end = tl.where(e < E, end, start)  # units past the last: no rows, nothing stored
        else:
            e, part, n, slot0 = tl.program_id(0), 0, 1, 0
            start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
            end = tl.load(offsets_ptr + e)
        ms = tl.program_id(1) * BM + tl.arange(0, BM)
        ns = tl.program_id(2) * BN + tl.arange(0, BN)
        m_ok, n_ok = ms < KA, ns < NB
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        db = tl.zeros([BN], dtype=tl.float32)
        for r0 in range(start, end, BK):
            rows = r0 + tl.arange(0, BK)
            ok = rows < end
            flat = tl.load(order_ptr + rows, mask=ok, other=0).to(tl.int32)
            a_rows = (flat // TOPK) if GATHER_A else rows
            b_rows = (flat // TOPK) if GATHER_B else rows
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + ms[None, :], mask=ok[:, None] & m_ok[None, :], other=0.0)
            if ACT_A:
                r = tl.maximum(a.to(tl.float32), 0.0)
                a = r * r
            b = tl.load(b_ptr + b_rows[:, None] * stride_b + ns[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
            if SCALE_B:
                b = b.to(tl.float32) * tl.load(scale_ptr + flat, mask=ok, other=0.0).to(tl.float32)[:, None]
            if HAS_DB:
                db += tl.sum(b.to(tl.float32), 0)
            acc = tile_dot(tl.trans(a), b, acc, FP32)
        # scalar conditions enter the masks as bounds (the interpreter widens block & scalar to int)
        own = (part == 0) & (e < E) if SPLIT > 0 else e < E  # part 0 writes dW itself
        tile = ms[:, None] * NB + ns[None, :]
        tl.store(dw_ptr + e * KA * NB + tile, acc, mask=(ms < tl.where(own, KA, 0))[:, None] & n_ok[None, :])
        if SPLIT > 0:  # parts 1.. of real experts (a unit past the last has expert >= E, part > 0)
            slot = tl.maximum(slot0 + part - 1, 0)
            later = (part > 0) & (e < E)
            tl.store(ws_ptr + slot * KA * NB + tile, acc, mask=(ms < tl.where(later, KA, 0))[:, None] & n_ok[None, :])
        if HAS_DB:
            if tl.program_id(1) == 0:  # the bias gradient once per column tile
                tl.store(db_ptr + e * NB + ns, db, mask=ns < tl.where(own, NB, 0))
                if SPLIT > 0:
                    tl.store(dbws_ptr + slot * NB + ns, db, mask=ns < tl.where(later, NB, 0))
        if HAS_SQ:  # a split expert's squares come from the fix-up, which holds its whole sums
            _store_sq(sq_ptr, e, acc, KA, NB, (n == 1) & own if SPLIT > 0 else own, SQ, BM, BN)

    @triton.jit
    def _store_sq(sq_ptr, e, acc, KA, NB, ok, SQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """The tile's sum of squares in the first SQ-square slot it covers, zeros in its others
        (`sq_shape`); masked loads left zeros outside the weight, so acc's squares are the tile's own."""
        total = tl.sum(tl.sum(acc * acc, 1), 0)
        g1, g2 = (KA + SQ - 1) // SQ, (NB + SQ - 1) // SQ
        j1, j2 = tl.arange(0, BM // SQ), tl.arange(0, BN // SQ)
        s1, s2 = tl.program_id(1) * (BM // SQ) + j1, tl.program_id(2) * (BN // SQ) + j2
        first = (j1 == 0)[:, None] & (j2 == 0)[None, :]
        tl.store(sq_ptr + e * g1 * g2 + s1[:, None] * g2 + s2[None, :], tl.where(first, total, 0.0),
                 mask=(s1 < tl.where(ok, g1, 0))[:, None] & (s2 < g2)[None, :])

    @triton.jit
    def _wgrad_fixup_kernel(dw_ptr, db_ptr, sq_ptr, ws_ptr, dbws_ptr, offsets_ptr, E, KA, NB, HAS_DB: tl.constexpr,
                            HAS_SQ: tl.constexpr, SQ: tl.constexpr, SPLIT: tl.constexpr, E_P2: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr):
        """dW[e] += the workspace's parts 1..n-1 of every expert split into n > 1 parts, in part
        order (deterministic), the same for db; then that expert's sums of squares. A [BM, BN] tile
        of one expert per program; experts in one part store nothing."""
        e = tl.program_id(0)
        es, _, _, parts = _expert_parts(offsets_ptr, E, E_P2, SPLIT)
        n = tl.sum(tl.where(es == e, parts, 0), 0)
        slot0 = tl.sum(tl.where(es < e, parts - 1, 0), 0)
        ms = tl.program_id(1) * BM + tl.arange(0, BM)
        ns = tl.program_id(2) * BN + tl.arange(0, BN)
        split = n > 1
        ok = (ms < tl.where(split, KA, 0))[:, None] & (ns < NB)[None, :]
        n_ok = ns < tl.where(split, NB, 0)
        tile = ms[:, None] * NB + ns[None, :]
        acc = tl.load(dw_ptr + e * KA * NB + tile, mask=ok, other=0.0)
        db = tl.zeros([BN], dtype=tl.float32)
        if HAS_DB:
            db = tl.load(db_ptr + e * NB + ns, mask=n_ok, other=0.0)
        for p in range(1, n):
            acc += tl.load(ws_ptr + (slot0 + p - 1) * KA * NB + tile, mask=ok, other=0.0)
            if HAS_DB:
                db += tl.load(dbws_ptr + (slot0 + p - 1) * NB + ns, mask=n_ok, other=0.0)
        tl.store(dw_ptr + e * KA * NB + tile, acc, mask=ok)
        if HAS_DB:  # once per column tile
            tl.store(db_ptr + e * NB + ns, db, mask=ns < tl.where(split & (tl.program_id(1) == 0), NB, 0))
        if HAS_SQ:
            _store_sq(sq_ptr, e, acc, KA, NB, split, SQ, BM, BN)


# ----------------------------------------------------------------------------------------------
# launches

_WGRAD_KEY = ["KA", "NB", "M", "GATHER_A", "ACT_A", "GATHER_B", "SCALE_B", "FP32", "SPLIT"]  # SPLIT: other registers
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


def launch(a, b, order, offsets, dw, db, topk: int, fp32: bool, *, gather_a=False, act=False, gather_b=False,
           scale=None, config=None, sq=None, split: int = 0):
    """`_wgrad_kernel` autotuned, or with `config` = (BM, BN, BK, warps, stages) at that tiling
    (bench/wgrad.py times each configuration); `sq` [`sq_shape`]: the tiles' sums of squares too;
    `split` > 0: experts with more rows than that in parts (`wgrad_split`; then a fix-up launch)."""
    E, KA, NB = dw.shape
    M = order.numel()
    if sq is not None and tuple(sq.shape) != sq_shape(E, KA, NB):
        raise ValueError(f"wgrad.launch: sq has shape {tuple(sq.shape)}, dW {tuple(dw.shape)} needs {sq_shape(E, KA, NB)}")
    if config is None:
        kernel, meta = _tuned(), _untuned_config()
    else:
        bm, bn, bk, warps, stages = config
        kernel, meta = _wgrad_kernel, {"BM": bm, "BN": bn, "BK": bk, "num_warps": warps, "num_stages": stages}
    # at most M // split parts beyond each expert's first: the workspace's slots, static for the shape
    extra = M // split if split > 0 else 0
    ws = dw.new_empty(extra, KA, NB) if extra else dw
    dbws = dw.new_empty(extra, NB) if extra and db is not None else dw
    split = split if extra else 0  # no expert can have more rows than `split`: one part each
    kernel[lambda m: (E + extra, triton.cdiv(KA, m["BM"]), triton.cdiv(NB, m["BN"]))](
        a, a.stride(0), b, b.stride(0), order, dw if scale is None else scale, offsets, dw, dw if db is None else db,
        dw if sq is None else sq, ws, dbws, E, KA, NB, M=M, TOPK=topk, GATHER_A=gather_a, ACT_A=act,
        GATHER_B=gather_b, SCALE_B=scale is not None, HAS_DB=db is not None, HAS_SQ=sq is not None, SQ=SQ_TILE,
        SPLIT=split, E_P2=pow2_at_least(E), FP32=fp32, **meta)
    if split:
        bm, bn = (16, 16) if interpreting() else (64, 128)
        _wgrad_fixup_kernel[(E, triton.cdiv(KA, bm), triton.cdiv(NB, bn))](
            dw, dw if db is None else db, dw if sq is None else sq, ws, dbws, offsets, E, KA, NB, HAS_DB=db is not None,
            HAS_SQ=sq is not None, SQ=SQ_TILE, SPLIT=split, E_P2=pow2_at_least(E), BM=bm, BN=bn)


def wgrad_applies(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> bool:
    """Whether `gathered_wgrad` serves these operands: Triton on their device, bf16 or fp32, and every
    offset the kernel forms within int32."""
    return (available(a.device) and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float32)
            and max(a.numel(), b.numel(), n_experts * a.shape[1] * b.shape[1]) < 2**31)


# Row splitting of the weight gradient (`launch(split=)`): an expert with more than WGRAD_SPLIT times
# the mean rows per expert is cut into parts of at most that many rows, one program each, summed by
# a fix-up kernel in part order (deterministic). The kernel's time is its busiest expert's row loop:
# under a random-init router's skew (the (a) bench: the busiest expert ~11x the mean) it took 117.5
# us per call in the step against 74-98 alone with balanced routing (H200, 2026-12-04). 0: off
# (not yet timed on a GPU); balanced routing splits nothing.
WGRAD_SPLIT = 0


def wgrad_split(rows: int, n_experts: int) -> int:
    """The `split` rows for `gathered_wgrad` at `rows` sorted rows over `n_experts` (0: none)."""
    return max(64, WGRAD_SPLIT * -(-rows // n_experts)) if WGRAD_SPLIT > 0 else 0


@torch.library.custom_op("vpmoe::gathered_wgrad", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def gathered_wgrad(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, gather_a: bool,
                   bias: bool, sq: bool = False, split: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight gradient of a grouped GEMM whose rows are sorted by expert, in fp32, straight from
    `_wgrad_kernel`: dW[e] = sum over e's rows r of A'[r]^T B'[r], where the operand named by
    `gather_a` is read through `index` (A'[r] = A[index[r]], else B'[r] = B[index[r]]), so neither
    gathered operand is materialised; with `bias`, db[e] = sum_r B'[r] too (else db is empty); with
    `sq`, partial sums of dW's squares [`sq_shape`] whose total is ||dW||^2 (else empty): taken from
    the kernel's registers, so the optimizer's clipping norm need not read dW again. `split` > 0:
    experts with more rows than that are cut into parts (`wgrad_split`, `WGRAD_SPLIT`).
    The grouped-GEMM path's form (`kernels._GatherGemm`, `kernels._DownSum`) wrote a bf16
    gradient (and for the up GEMM first gathered its rows with a ones column), which the
    compiled backward then cast to fp32 for the master weight: three passes where this is one."""
    a, b = a.contiguous(), b.contiguous()
    dw, db, sq_parts = _wgrad_outputs(a, b, offsets, bias, sq)
    launch(a, b, index, offsets, dw, db if bias else None, 1, a.dtype == torch.float32, gather_a=gather_a,
           gather_b=not gather_a, sq=sq_parts if sq else None, split=split)
    return dw, db, sq_parts


def _wgrad_outputs(a, b, offsets, bias: bool, sq: bool):
    E, KA, NB = offsets.shape[0], a.shape[1], b.shape[1]
    return (a.new_empty(E, KA, NB, dtype=torch.float32), a.new_empty(E if bias else 0, NB, dtype=torch.float32),
            a.new_empty(sq_shape(E, KA, NB) if sq else (0,), dtype=torch.float32))


@gathered_wgrad.register_fake
def _(a, b, index, offsets, gather_a, bias, sq=False, split=0):
    return _wgrad_outputs(a, b, offsets, bias, sq)

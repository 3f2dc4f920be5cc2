"""The routed experts as Triton grouped GEMMs that gather, scale and scatter rows themselves.

`kernels.routed_experts` (the reference and fallback) materialises the N*k dispatched rows with a
ones column ([N*k, d + 8] bf16), runs two `torch._grouped_mm`, keeps the down GEMM's [N*k, d]
output for the combine's backward, and moves the same rows again in backward: on the 80-layer
H200 step these gathers, combines and their backward took ~400 ms of 2.8 s (docs/performance.md).
Here the GEMM kernels read the token rows through the sort order and write where the rows belong
(the idea of ScatterMoE, written anew), so only h [N*k, H] (H = 128, the expert width) is saved.

With the (token, slot) pairs sorted by expert (`order[r]` = token * k + slot of sorted row r,
`offsets` = group ends) and w = the routing weight of a pair:
    h[r]            = x[order[r] // k] @ W_up[e] + b_up[e]                      (gather on load)
    Y[order[r]]     = w * (relu(h[r])^2 @ W_down[e] + b_down[e])                (scale, scatter on store)
    y[t]            = sum_s Y[t * k + s]                                         (fp32)
and backward, from gy [N, d]:
    u[r]            = gy[t] @ W_down[e]^T,  c[r] = gy[t] . b_down[e]          (t = order[r] // k)
    g_w[order[r]]   = relu(h[r])^2 . u[r] + c[r]                                 (the combine's weight grad)
    g_h[r]          = w * u[r] * 2 relu(h[r])
    G[order[r]]     = g_h[r] @ W_up[e]^T;  gx[t] = sum_s G[t * k + s]
    dW_down[e]      = sum_r relu(h[r])^2 (x) w gy[t],  db_down[e] = sum_r w gy[t]
    dW_up[e]        = sum_r x[t] (x) g_h[r],           db_up[e]   = sum_r g_h[r]
The combine's weight gradient comes from u (no [N*k, d] down output is kept): <rows, gy> =
<act, gy W^T> + <b, gy>.

Design choices:
- `_rows_kernel` (one output row per sorted row) maps each program to (expert, row tile) from the
  group ends inside the kernel (a cumulative sum over the E tile counts), so the grid is fixed
  (rows / BM + E programs, the rest exit): no host sync, CUDA-graph capturable. Flags pick the
  gather, the squared-ReLU on load, bias, scale, scatter, and the down GEMM's backward epilogue.
  `_wide_rows_kernel` serves the short-K, wide-N GEMMs (the down GEMM, the up GEMM's input
  gradient): it keeps its row tile and loops over the column tiles. The weight gradients come from
  `vpmoe.model.wgrad` (one program per expert and output tile loops over the expert's rows).
  `_sum_slots_kernel` sums each token's k slot rows in fp32.
- Offsets are int32 (a call refuses more than 2^31 elements per operand): int64 offset tensors for
  the gathered loads and scattered stores took ~100 more registers per thread.
- Every output element is written exactly once (no atomics): deterministic, and autotuning's
  repeated runs are harmless.
- The GEMMs read copies of the weights in the GEMM dtype (bf16 on GPUs; `routed_experts` makes them
  per call); the gradients come out in fp32 for the master weights (the grouped-GEMM path rounds
  them to bf16). Accumulation is fp32; biases, the activation and the scale are applied in fp32.
- `moe_experts` is a `torch.library.custom_op` with a registered backward: opaque to
  torch.compile (fullgraph blocks keep 0 graph breaks), fixed grids, no host sync.
- Status (H200, docs/performance.md): one MoE layer alone is faster than the grouped-GEMM path
  (5.68 vs 6.02 ms at 64k tokens) and keeps 1 GiB less, but the whole train step is slower (80
  layers: 3,102 vs 2,790 ms), so `FastBody` uses it only when asked (`fused_moe=True`).
- The same weight-gradient kernel serves the grouped-GEMM path (`wgrad.gathered_wgrad`,
  `kernels.FUSED_WGRAD`, on by default): its weight gradients in fp32, rows read through the token index.
- Tests: tests/test_moe_fused.py runs the kernels under the Triton interpreter (CPU) against float64
  and FastBody with them against the grouped path; tests/gpu/test_gpu_moe_fused.py on the GPU.
"""
from __future__ import annotations

import torch

# available: fast.py asks this module whether its kernels run on a device
from vpmoe.model.tpa_fused import available, interpreting  # noqa: F401  (the same test for every Triton op)
from vpmoe.model.wgrad import bf16_rounded, pow2_at_least, tile_dot
from vpmoe.model.wgrad import launch as launch_wgrad

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use kernels.routed_experts
    triton = None

# (BM, BN, BK, warps, stages), autotuned per shape on CUDA; BN is capped at the output width
ROWS_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                (64, 128, 128, 4, 3), (128, 256, 64, 8, 3)]
WIDE_CONFIGS = [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 8, 3), (128, 256, 8, 3)]  # BM, BN, warps, stages
def supported(d_model: int, width: int) -> bool:
    """The down GEMM's backward epilogue holds a whole expert row: width a power of two, 16..256."""
    return 16 <= width <= 256 and width & (width - 1) == 0 and d_model % 8 == 0


# ----------------------------------------------------------------------------------------------
# kernels

if triton is not None:
    INTERPRETING = tl.constexpr(interpreting())

    @triton.jit
    def _expert_tile(pid, offsets_ptr, E: tl.constexpr, E_P2: tl.constexpr, BM: tl.constexpr):
        """(expert, first row, group end) of row tile `pid` when each expert's rows are cut into
        BM-row tiles in expert order; expert >= E for the programs past the last tile."""
        es = tl.arange(0, E_P2)
        ends = tl.load(offsets_ptr + es, mask=es < E, other=0)
        starts = tl.load(offsets_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
        tiles = tl.where(es < E, (ends - starts + BM - 1) // BM, 0)
        cum = tl.cumsum(tiles, 0)
        e = tl.sum((cum <= pid).to(tl.int32), 0)
        pick = es == e
        first_tile = tl.sum(tl.where(pick, cum - tiles, 0), 0)
        start = tl.sum(tl.where(pick, starts, 0), 0)
        end = tl.sum(tl.where(pick, ends, 0), 0)
        return e, start + (pid - first_tile) * BM, end

    @triton.jit
    def _stored(x, dtype):
        """x in the output's dtype, rounded to nearest in the interpreter too."""
        if INTERPRETING and dtype == tl.bfloat16:
            return bf16_rounded(x).to(dtype)
        return x.to(dtype)

    @triton.jit
    def _rows_kernel(a_ptr, stride_a, order_ptr, w_ptr, s_we, s_wk, s_wn, bias_ptr, s_be, scale_ptr,
                     out_ptr, stride_o, offsets_ptr, h_ptr, stride_h, gw_ptr, N, M,
                     K: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr, TOPK: tl.constexpr,
                     GATHER_A: tl.constexpr, ACT_A: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SCALE: tl.constexpr, SCATTER: tl.constexpr, DOWN_BACKWARD: tl.constexpr,
                     FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[r or order[r]] = epilogue(A'[r] @ W[e]) for the sorted rows r of one (expert, row tile)
        and one column tile. A'[r] = A[order[r] // TOPK] (GATHER_A) or A[r], squared-ReLU'd (ACT_A).
        Epilogue: + bias[e], * scale[order[r]], stored at order[r] (SCATTER) or r. DOWN_BACKWARD
        (A = gy, W = W_down^T, bias = b_down, BN = the whole width): out = g_h, gw[order[r]] = the
        combine's weight gradient (see the module docstring)."""
        e, row0, end = _expert_tile(tl.program_id(0), offsets_ptr, E, E_P2, BM)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < end
        flat = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        a_rows = (flat // TOPK) if GATHER_A else rows
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        col_ok = cols < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        c = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if ACT_A:
                r = tl.maximum(a.to(tl.float32), 0.0)
                a = r * r
            if DOWN_BACKWARD:  # c = gy[t] . b_down[e], in fp32
                bd = tl.load(bias_ptr + e * s_be + ks, mask=k_ok, other=0.0).to(tl.float32)
                c += tl.sum(a.to(tl.float32) * bd[None, :], 1)
            w = tl.load(w_ptr + e * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tile_dot(a, w, acc, FP32)
        ok = row_ok[:, None] & col_ok[None, :]
        if DOWN_BACKWARD:
            hv = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0)
            r = tl.maximum(hv.to(tl.float32), 0.0)
            gw = tl.sum(r * r * acc, 1) + c
            tl.store(gw_ptr + flat, gw, mask=row_ok)
            scale = tl.load(scale_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * scale[:, None] * 2.0 * r
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + e * s_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SCALE:
                acc *= tl.load(scale_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out_rows = flat if SCATTER else rows
        tl.store(out_ptr + out_rows[:, None] * stride_o + cols[None, :], _stored(acc, out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _wide_rows_kernel(a_ptr, stride_a, order_ptr, w_ptr, s_we, s_wk, s_wn, bias_ptr, s_be, scale_ptr, out_ptr,
                          stride_o, offsets_ptr, N, M, K: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr,
                          TOPK: tl.constexpr, ACT_A: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr,
                          SCATTER: tl.constexpr, FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """`_rows_kernel` without the gather and the down-backward epilogue, for a short K (the expert
        width, 128) and a wide N (d_model): one program loads its [BM, K] row tile once and loops
        over the output's column tiles, so the weight tiles stream through a pipelined loop instead
        of each of N / BN programs reloading the rows for a two-step K loop."""
        e, row0, end = _expert_tile(tl.program_id(0), offsets_ptr, E, E_P2, BM)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < end
        flat = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        ks = tl.arange(0, K)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None], other=0.0)
        if ACT_A:
            r = tl.maximum(a.to(tl.float32), 0.0)
            a = r * r
        if SCALE:
            scale = tl.load(scale_ptr + flat, mask=row_ok, other=0.0).to(tl.float32)
        out_rows = flat if SCATTER else rows
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < N
            w = tl.load(w_ptr + e * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn, mask=col_ok[None, :], other=0.0)
            acc = tile_dot(a, w, tl.zeros([BM, BN], dtype=tl.float32), FP32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + e * s_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SCALE:
                acc *= scale[:, None]
            tl.store(out_ptr + out_rows[:, None] * stride_o + cols[None, :], _stored(acc, out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _sum_slots_kernel(rows_ptr, out_ptr, NT, D: tl.constexpr, TOPK: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr):
        """out[t] = sum_s rows[t * TOPK + s] in fp32 (stored in out's dtype), a [BT, BD] tile per program:
        the combine's sum over a token's slots. torch's sum(1) over [N, k, d] bf16 ran at 1.8 TB/s."""
        ts = tl.program_id(0) * BT + tl.arange(0, BT)
        cs = tl.program_id(1) * BD + tl.arange(0, BD)
        ok = (ts < NT)[:, None] & (cs < D)[None, :]
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for slot in tl.static_range(TOPK):
            acc += tl.load(rows_ptr + (ts * TOPK + slot)[:, None] * D + cs[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + ts[:, None] * D + cs[None, :], _stored(acc, out_ptr.dtype.element_ty), mask=ok)

# ----------------------------------------------------------------------------------------------
# launches

_kernels: dict = {}
_ROWS_KEY = ["N", "M", "K", "GATHER_A", "ACT_A", "SCALE", "SCATTER", "DOWN_BACKWARD", "FP32"]
_WIDE_KEY = ["N", "M", "K", "ACT_A", "SCALE", "SCATTER", "FP32"]


def _prune_rows(configs, nargs, **kwargs):
    """BN no wider than the output; the down GEMM's backward needs the whole expert row (BN = N)."""
    width = max(16, pow2_at_least(nargs["N"]))
    seen, out = set(), []
    for c in configs:
        bn = width if kwargs.get("DOWN_BACKWARD") else min(c.kwargs["BN"], width)
        spec = (c.kwargs["BM"], bn, c.kwargs["BK"], c.num_warps, c.num_stages)
        if spec not in seen:
            seen.add(spec)
            out.append(triton.Config({"BM": spec[0], "BN": bn, "BK": spec[2]}, num_warps=spec[3], num_stages=spec[4]))
    return out


def _tuned(which: str):
    """The kernel, autotuned per shape and flags on CUDA; the interpreter runs `_untuned_config`."""
    if which not in _kernels:
        kernel = {"rows": _rows_kernel, "wide": _wide_rows_kernel}[which]
        if not interpreting():
            if which == "wide":
                configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in WIDE_CONFIGS]
            else:
                configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                           for bm, bn, bk, w, s in ROWS_CONFIGS]
            kernel = triton.autotune(configs, key={"rows": _ROWS_KEY, "wide": _WIDE_KEY}[which],
                                     prune_configs_by={"early_config_prune": _prune_rows} if which == "rows" else None
                                     )(kernel)
        _kernels[which] = kernel
    return _kernels[which]


def _untuned_config(which: str, n: int = 0, down_backward: bool = False) -> dict:
    """The interpreter's tiles: small, so tests cross tile and expert boundaries."""
    if not interpreting():
        return {}
    if which == "rows":
        return {"BM": 16, "BN": max(16, pow2_at_least(n)) if down_backward else 16, "BK": 16}
    return {"BM": 16, "BN": 16}  # wide


def _rows(a, order, offsets, w, w_strides, out, N: int, K: int, topk: int, fp32: bool, *, gather=False, act=False,
          bias=None, scale=None, scatter=False, h=None, gw=None):
    M, E = order.numel(), offsets.numel()
    if K <= 256 and K & (K - 1) == 0 and not gather and h is None:  # short K, wide N: the row tile stays, columns loop
        _tuned("wide")[lambda meta: (triton.cdiv(M, meta["BM"]) + E,)](
            a, a.stride(0), order, w, *w_strides, out if bias is None else bias, 0 if bias is None else bias.stride(0),
            out if scale is None else scale, out, out.stride(0), offsets, N, M, K=K, E=E, E_P2=pow2_at_least(E), TOPK=topk,
            ACT_A=act, HAS_BIAS=bias is not None, SCALE=scale is not None, SCATTER=scatter, FP32=fp32,
            **_untuned_config("wide"))
        return
    _tuned("rows")[lambda meta: (triton.cdiv(M, meta["BM"]) + E, triton.cdiv(N, meta["BN"]))](
        a, a.stride(0), order, w, *w_strides, out if bias is None else bias, 0 if bias is None else bias.stride(0),
        out if scale is None else scale, out, out.stride(0), offsets, out if h is None else h,
        0 if h is None else h.stride(0), out if gw is None else gw, N, M,
        K=K, E=E, E_P2=pow2_at_least(E), TOPK=topk, GATHER_A=gather, ACT_A=act, HAS_BIAS=bias is not None,
        SCALE=scale is not None, SCATTER=scatter, DOWN_BACKWARD=h is not None, FP32=fp32,
        **_untuned_config("rows", N, h is not None))


def _sum_slots(rows: torch.Tensor, N: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[N * k, d] -> [N, d] in `dtype`: each token's k slot rows summed in fp32."""
    d = rows.shape[1]
    out = rows.new_empty(N, d, dtype=dtype)
    bt, bd = (4, 16) if interpreting() else (8, 512)
    _sum_slots_kernel[(triton.cdiv(N, bt), triton.cdiv(d, bd))](rows, out, N, D=d, TOPK=k, BT=bt, BD=bd,
                                                               **({} if interpreting() else {"num_warps": 8}))
    return out


def _check(x, weight, order, offsets, w_up, b_up, w_down, b_down) -> None:
    if triton is None:
        raise RuntimeError("moe_experts: Triton is not installed (use kernels.routed_experts)")
    N, d = x.shape
    E, d_up, H = w_up.shape
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"moe_experts: x must be bf16 or fp32, got {x.dtype}")
    if not supported(d, H):
        raise ValueError(f"moe_experts: expert width {H} must be a power of two in 16..256 and d_model {d} a "
                         f"multiple of 8 (use kernels.routed_experts)")
    if d_up != d or tuple(w_down.shape) != (E, H, d) or tuple(b_up.shape) != (E, H) or tuple(b_down.shape) != (E, d):
        raise ValueError(f"moe_experts: weights {tuple(w_up.shape)}, {tuple(w_down.shape)}, biases "
                         f"{tuple(b_up.shape)}, {tuple(b_down.shape)} do not match x {tuple(x.shape)}")
    if weight.dtype != torch.float32 or weight.shape[0] != N or order.numel() != weight.numel() \
            or offsets.numel() != E or offsets.dtype != torch.int32:
        raise ValueError(f"moe_experts: routing weight {tuple(weight.shape)} {weight.dtype} (fp32 [N, k]), order "
                         f"{order.numel()} rows and offsets {offsets.numel()} {offsets.dtype} (int32 [E]) "
                         f"do not match x {tuple(x.shape)} and {E} experts")
    if N * weight.shape[1] * max(d, H, x.stride(0)) >= 2**31 or E * d * H >= 2**31:  # int32 offsets in the kernels
        raise ValueError(f"moe_experts: {N} tokens x top-{weight.shape[1]} is too many for one call (int32 "
                         f"offsets); split the batch")
    if x.stride(1) != 1 or not weight.is_contiguous() or b_up.stride(1) != 1 or b_down.stride(1) != 1:
        raise ValueError("moe_experts: x, the routing weight and the biases need contiguous rows")


@torch.library.custom_op("vpmoe::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                w_up: torch.Tensor, b_up: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                w_up_gemm: torch.Tensor, w_down_gemm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, d] fp32, h [N*k, H] in x's dtype): y[t] = sum_s weight[t, s] * expert(x[t]) for the
    experts the routing sorted into `order` / `offsets` (see the module docstring). The GEMMs read
    `w_*_gemm`, copies of the (fp32 master) weights in the GEMM dtype: loading fp32 tiles and rounding
    them in the kernel ran the up GEMM at 184 instead of 322 TFLOP/s (bench/RESULTS.md moe_sweep);
    the weights' gradients are returned for `w_up` / `w_down` in their own dtype."""
    _check(x, weight, order, offsets, w_up, b_up, w_down, b_down)
    (N, d), (_, _, H), k = x.shape, w_up.shape, weight.shape[1]
    fp32 = x.dtype == torch.float32
    h = x.new_empty(N * k, H)
    _rows(x, order, offsets, w_up_gemm, w_up_gemm.stride(), h, H, d, k, fp32, gather=True, bias=b_up)
    rows = x.new_empty(N * k, d)  # weighted expert outputs, at each (token, slot)'s own place
    _rows(h, order, offsets, w_down_gemm, w_down_gemm.stride(), rows, d, H, k, fp32, act=True, bias=b_down,
          scale=weight.view(-1), scatter=True)
    return _sum_slots(rows, N, k, torch.float32), h


@moe_experts.register_fake
def _(x, weight, order, offsets, w_up, b_up, w_down, b_down, w_up_gemm, w_down_gemm):
    N, k, H = x.shape[0], weight.shape[1], w_up.shape[-1]
    return x.new_empty(N, x.shape[1], dtype=torch.float32), x.new_empty(N * k, H)


@torch.library.custom_op("vpmoe::moe_experts_backward", mutates_args=())
def moe_experts_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor,
                         offsets: torch.Tensor, h: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                         b_down: torch.Tensor) -> list[torch.Tensor]:
    """fp32 gradients of `moe_experts`'s y for (x, weight, w_up, b_up, w_down, b_down)."""
    (N, d), (E, _, H), k = x.shape, w_up.shape, weight.shape[1]
    fp32 = x.dtype == torch.float32
    gy = gy.contiguous().float()
    g_h, g_weight = x.new_empty(N * k, H), weight.new_empty(N * k)
    w_down_t = (w_down.stride(0), w_down.stride(2), w_down.stride(1))  # W_down[e]^T as [d, H]
    _rows(gy, order, offsets, w_down, w_down_t, g_h, H, d, k, fp32, gather=True, bias=b_down,
          scale=weight.view(-1), h=h, gw=g_weight)
    g_rows = x.new_empty(N * k, d)
    w_up_t = (w_up.stride(0), w_up.stride(2), w_up.stride(1))  # W_up[e]^T as [H, d]
    _rows(g_h, order, offsets, w_up, w_up_t, g_rows, d, H, k, fp32, scatter=True)
    g_x = _sum_slots(g_rows, N, k, torch.float32)
    dw_down, db_down = gy.new_empty(E, H, d), gy.new_empty(E, d)
    launch_wgrad(h, gy, order, offsets, dw_down, db_down, k, fp32, act=True, gather_b=True, scale=weight.view(-1))
    dw_up, db_up = gy.new_empty(E, d, H), gy.new_empty(E, H)
    launch_wgrad(x, g_h, order, offsets, dw_up, db_up, k, fp32, gather_a=True)
    return [g_x, g_weight.view(N, k), dw_up, db_up, dw_down, db_down]


@moe_experts_backward.register_fake
def _(gy, x, weight, order, offsets, h, w_up, w_down, b_down):
    (N, d), (E, _, H) = x.shape, w_up.shape
    f = dict(dtype=torch.float32)
    return [x.new_empty(N, d, **f), weight.new_empty(weight.shape, **f), x.new_empty(E, d, H, **f),
            x.new_empty(E, H, **f), x.new_empty(E, H, d, **f), x.new_empty(E, d, **f)]


def _setup_context(ctx, inputs, output):
    x, weight, order, offsets, w_up, b_up, w_down, b_down, w_up_gemm, w_down_gemm = inputs
    ctx.save_for_backward(x, weight, order, offsets, output[1], w_up_gemm, w_down_gemm, b_down)
    ctx.dtypes = [t.dtype for t in (x, weight, w_up, b_up, w_down, b_down)]


def _backward(ctx, gy, _gh):
    x, weight, order, offsets, h, w_up, w_down, b_down = ctx.saved_tensors
    if gy is None:
        gy = x.new_zeros(x.shape, dtype=torch.float32)
    grads = moe_experts_backward(gy, x, weight, order, offsets, h, w_up, w_down, b_down)
    g_x, g_weight, dw_up, db_up, dw_down, db_down = (g.to(dt) for g, dt in zip(grads, ctx.dtypes))
    return g_x, g_weight, None, None, dw_up, db_up, dw_down, db_down, None, None


moe_experts.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# entry point


def routed_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_up, b_up, w_down,
                   b_down) -> torch.Tensor:
    """`kernels.routed_experts` (same contract: x [N, d] in the GEMM dtype, fp32 result [N, d]) on the
    fused kernels. All of the model's experts (no expert-parallel `first` offset)."""
    from vpmoe.model.kernels import sort_by_expert

    _, order, offsets = sort_by_expert(topk_idx, w_up.shape[0])
    # the GEMM-dtype weight copies carry no gradient (the op returns it for the masters); compiled,
    # the casts fuse into one kernel each
    w_up_gemm, w_down_gemm = (w.detach().to(x.dtype) for w in (w_up, w_down))
    y, _ = moe_experts(x, topk_weight.float().contiguous(), order, offsets, w_up, b_up, w_down, b_down,
                       w_up_gemm, w_down_gemm)
    return y

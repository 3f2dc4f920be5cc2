"""The fast body's dense linears (attention projections, output projection, dense and shared FFNs):
bf16 GEMMs on fp32 masters, with fp32 weight gradients, and the weights cast once per forward.

Design choices:
- fp32 weight gradients from the GEMM (`_LinearParts`, `F32_WEIGHT_GRADS`): dW = g^T x as one
  GEMM with an fp32 result and db summed in fp32, instead of a bf16 product that a kernel of its
  own widens to the master's dtype. In the (a) step's generated backward of an MoE block four such
  casts (0.52-1.6M elements, ~2 us each plus a launch) were these. A/B on an H100 (2026-12-07
  12:05): (a) 54.98 / 54.85 ms off, 54.74 / 54.71 on. Off: the plain cast-then-linear path, kept
  as the tests' second code path.
- The weights cast once per forward, before the blocks (`DenseCopies`, `DENSE_COPIES`): each
  block's compiled forward cast its dense weights and biases itself, ~7 tiny launches a layer
  (the six TPA factors' concatenation, the output projection, the shared expert's two weights and
  three biases; a checkpointed block again in its recompute), each a few microseconds at
  0.1-1M elements. `DenseCopies` keeps every block's weights in the GEMM dtype, the attention
  projection's parts already concatenated (one buffer, as the GEMM wants it), and refreshes all of
  them at the start of each forward with one multi-tensor copy (`torch._foreach_copy_`): the same
  bytes, a few launches instead of ~7 a layer. The copies are memory of their own (~4.8 MB a
  layer at vpMoE's dims, ~0.4 GB at 80 layers) and the same bits as the casts; `_LinearParts`
  takes a copy and its masters, and hands each master its slice of the fp32 gradient (`linear`'s
  uncopied path is the same function with one part). Measured at
  (a) on an H100 (2026-12-07 22:06-22:10, interleaved): 51.43 / 51.59 ms off, 51.39 / 51.34 on
  (-0.15 ms, where the launch count predicted -0.4). The bf16x3 router's weight is kept too
  (`router=True`), for its backward's GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vpmoe.model import kernels as K

F32_WEIGHT_GRADS = True  # (module docstring) False: the cast-then-linear path
DENSE_COPIES = True  # (module docstring) False: each block casts its dense weights itself
HALF = (torch.bfloat16, torch.float16)
TPA_NAMES = ("a_q", "b_q", "a_k", "b_k", "a_v", "b_v")  # tpa_fused.column_layout's order


def dense_groups(cfg, layer: int) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{linear: (its weight parts' parameter names, its bias parts' names)} for one block: the
    parts are concatenated along the output rows in this order (one GEMM)."""
    if cfg.is_global(layer):
        qkv = ("wq", "wk", "wv")
        groups = {"attn.qkv": (tuple(f"attn.{n}.weight" for n in qkv), tuple(f"attn.{n}.bias" for n in qkv))}
    else:
        groups = {"attn.tpa": (tuple(f"attn.{n}.weight" for n in TPA_NAMES), ())}
    groups["attn.wo"] = (("attn.wo.weight",), ("attn.wo.bias",))
    prefix = "ffn.shared." if cfg.is_moe(layer) else "ffn."
    for part in ("up", "down"):
        groups[f"{prefix}{part}"] = ((f"{prefix}{part}.weight",), (f"{prefix}{part}.bias",))
    return groups


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    """x @ w^T + b with x, w and b cast to `dt` (the GEMM dtype): an fp32 master's gradients in fp32
    from the GEMM (`_LinearParts` with one part, `F32_WEIGHT_GRADS`), else the cast-then-linear path."""
    if F32_WEIGHT_GRADS and w.dtype == torch.float32 and dt in HALF:
        return _LinearParts.call(x, w.detach().to(dt), None if b is None else b.detach().to(dt),
                                 [w], [] if b is None else [b])
    return F.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))


def group_linear(p: dict, x: torch.Tensor, name: str, parts: tuple, dt: torch.dtype) -> torch.Tensor:
    """The block's linear `name` (`dense_groups`: `parts` = (weight names, bias names)) on x, from
    its kept copy where `DenseCopies` put one in `p` (`low.<name>.weight` / `.bias`), else from
    the masters cast here."""
    ws, bs = parts
    low = p.get(f"low.{name}.weight")
    if low is not None:
        return _LinearParts.call(x, low, p.get(f"low.{name}.bias"), [p[n] for n in ws], [p[n] for n in bs])
    w = p[ws[0]] if len(ws) == 1 else torch.cat([p[n] for n in ws])
    b = None if not bs else p[bs[0]] if len(bs) == 1 else torch.cat([p[n] for n in bs])
    return linear(x, w, b, dt)


class _LinearParts(torch.autograd.Function):
    """y = x @ w^T + b in the GEMM dtype from the weight and bias already cast (and concatenated:
    `w_low`, `b_low`, `DenseCopies`' buffers or `linear`'s casts; the forward casts only x), with the
    fp32 masters' gradients: dW = g^T x with fp32 sums and an fp32 result (`kernels.mm_f32`, one
    GEMM, no rounding to the GEMM dtype), db = the rows of g summed in fp32, each of the up to six
    weight parts and three bias parts (the masters; None past the last) getting its rows of them;
    dx = g w in the GEMM dtype, returned in x's dtype (what the casts' and F.linear's backward give).
    A fixed signature: Dynamo traced a `*masters` forward under no_grad as a plain call with the
    arguments shifted (torch 2.13: "save_for_backward is not defined on FakeTensor")."""

    @staticmethod
    def forward(ctx, x, w_low, b_low, w0, w1, w2, w3, w4, w5, b0, b1, b2):
        x_lo = x.to(w_low.dtype)
        ctx.save_for_backward(x_lo, w_low)
        ctx.x_dtype = x.dtype
        ctx.w_rows = [w.shape[0] for w in (w0, w1, w2, w3, w4, w5) if w is not None]
        ctx.b_parts = [(b.shape[0], b.dtype) for b in (b0, b1, b2) if b is not None]
        return F.linear(x_lo, w_low, b_low)

    @staticmethod
    def backward(ctx, g):
        x_lo, w_low = ctx.saved_tensors
        g = g.to(w_low.dtype)
        rows = g.reshape(-1, g.shape[-1])
        g_ws = list(K.mm_f32(rows.t(), x_lo.reshape(-1, x_lo.shape[-1])).split(ctx.w_rows))
        g_bs = [] if not ctx.b_parts else [
            part.to(dtype) for part, (_, dtype) in
            zip(rows.sum(0, dtype=torch.float32).split([n for n, _ in ctx.b_parts]), ctx.b_parts)]
        return ((g @ w_low).to(ctx.x_dtype), None, None, *g_ws, *[None] * (6 - len(g_ws)),
                *g_bs, *[None] * (3 - len(g_bs)))

    @staticmethod
    def call(x, w_low, b_low, weights: list, biases: list) -> torch.Tensor:
        """apply() with the parts as lists (at most six weights and three biases)."""
        if len(weights) > 6 or len(biases) > 3:
            raise ValueError(f"_LinearParts: at most 6 weight and 3 bias parts, got {len(weights)} and {len(biases)}")
        return _LinearParts.apply(x, w_low, b_low, *weights, *[None] * (6 - len(weights)),
                                  *biases, *[None] * (3 - len(biases)))


class DenseCopies:
    """Every block's dense weights and biases in the GEMM dtype (module docstring): `cast()` refreshes
    them all from the masters (one multi-tensor copy; call it before each forward), `entries(i)` is
    block i's {`low.<linear>.weight` / `.bias`: copy} for its parameter dict (`group_linear`).
    `router`: the MoE blocks' router weights too (`low.ffn.router.weight`), for the bf16x3 router's
    backward (`kernels._RouterLogits`)."""

    def __init__(self, cfg, block_params: list[dict], dtype: torch.dtype, router: bool = False):
        self.blocks: list[dict[str, torch.Tensor]] = []
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []
        for i, p in enumerate(block_params):
            entries = {}
            groups = dense_groups(cfg, i)
            if router and cfg.is_moe(i):  # the bf16x3 router's backward GEMM takes w in bf16 (kernels._RouterLogits)
                groups["ffn.router"] = (("ffn.router.weight",), ())
            for name, (ws, bs) in groups.items():
                for kind, names in (("weight", ws), ("bias", bs)):
                    if not names:
                        continue
                    masters = [p[n] for n in names]
                    buf = torch.empty((sum(m.shape[0] for m in masters), *masters[0].shape[1:]), dtype=dtype,
                                      device=masters[0].device)
                    self.dst += list(buf.split([m.shape[0] for m in masters]))
                    self.src += masters
                    entries[f"low.{name}.{kind}"] = buf
            self.blocks.append(entries)

    def cast(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.dst, self.src)

    def entries(self, layer: int) -> dict[str, torch.Tensor]:
        return self.blocks[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dst)


def wants_copies(dtype: torch.dtype, master_dtype: torch.dtype) -> bool:
    """Whether a body keeps `DenseCopies`: asked for, a half-precision GEMM dtype and fp32 masters
    (the fp32-gradient path, `F32_WEIGHT_GRADS`, that `_LinearParts` is)."""
    return DENSE_COPIES and F32_WEIGHT_GRADS and dtype in HALF and master_dtype == torch.float32

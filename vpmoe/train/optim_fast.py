"""A fast, host-sync-free step for `vpmoe.train.optim.MuonAdamW`: same state, same math.

`FastMuonAdamW(opt, max_grad_norm)` wraps a MuonAdamW; `step()` equals
`torch.nn.utils.clip_grad_norm_(params, max_grad_norm); opt.step()` (up to rounding), reading and
writing the same `opt.state` entries, so checkpoints and the reference step stay interchangeable.

Design choices:
- Gradient clipping is folded in: the global norm comes from `_foreach_norm` (no host sync) and the
  clip factor multiplies the gradient where the step reads it, instead of a separate pass that
  rewrites every gradient (for 6B fp32 params that pass alone moves 48 GB).
- Muon on the routed experts' 3-D tensors `[E, m, n]` runs in chunks of `ns_chunk` matrices: one
  fused kernel (torch.compile) does momentum, Nesterov and the bf16 cast; Newton-Schulz runs
  batched on the chunk, compiled; one fused kernel applies weight decay and the update.
  Newton-Schulz for matrices 4x (or more) wider than tall (the experts' 128 x 1024) iterates on the
  Gram side (`gram_newton_schulz`: the big operand is read twice per restart segment instead of
  twice per step); `ns_method="standard"` keeps the X-side iteration (`newton_schulz_batched`,
  one GEMM per step over the big operand) everywhere. Measured on an
  H200 (bench/RESULTS.md, optimizer sweep): whole tensors (256 matrices) beat L2-sized chunks
  (32-64), eager and in a CUDA graph alike, so 256 is the default.
- `ns_pack` (4) packs the n x n Gram-side iterations of that many whole expert tensors into one
  batch (`gram_newton_schulz_packed`): at 20 layers their 128 x 128 products ran as 532 launches
  of ~6 us. Packing cuts the launches, not their time (those products are slow per FLOP at K = 128
  either way); with the streams below it gives the best step measured (H200, docs/performance.md).
- Muon on 2-D matrices: same-shape matrices are stacked and orthogonalised in one batched call;
  momentum and updates use `_foreach` ops; the whole of it (`_muon_matrices`) is compiled per
  shape on CUDA, so the Newton-Schulz pointwise work fuses and the `_foreach` ops become Inductor's
  multi-tensor kernels.
- `streams` (3): the step's independent pieces (each expert tensor or pack, each 2-D shape, each
  AdamW tensor or dtype group) go round-robin onto that many CUDA streams, so the small
  Newton-Schulz launches overlap the bandwidth-bound momentum and update kernels instead of waiting
  for them. On the CPU it runs in order. Measured at 20 layers (optimizer alone, graphed): 27.2 ms
  on one stream, 26.6 on three, 25.8 on three with packs of four; at 80 layers 95.8 ms.
- `order` ("adamw_first", the default): the AdamW jobs (the embedding's and head's passes, ~1.9 ms
  each at 20 layers on an H100) are queued before the Muon ones, so the experts' latency-bound
  pieces (the n x n chains, the 2-D Newton-Schulz) run beside them. Queued last ("muon_first"),
  they ran after every other job, one stream alone for ~3.8 ms of the 20-layer step's 24
  (bench/optim_step.py --timeline). H100, 2026-12-07, interleaved in one lease: (a) 55.80 / 55.80
  / 55.84 ms against 56.58 / 56.49 / 56.47 for "muon_first"; the optimizer alone 23.04 against
  23.50 ms. Jobs by decreasing bytes, each onto the least loaded stream (longest-processing-time
  first), read 56.14 / 56.32 ms and were removed. The same bits either order (independent jobs).
- `fuse_update` (off until measured): the packed experts' update W <- W * decay + step * Q X is
  applied in the epilogue of Newton-Schulz's last product (`ns_update.qx_update`, a Triton kernel),
  so the bf16 product is never written and read back (4 of ~36 bytes per expert parameter). Where
  the kernel does not apply (`ns_update.applies`: the CPU, fp32 Newton-Schulz) the flag is a no-op.
- `gram_kernel`: each restart segment of the packed experts' n x n Gram-side iteration runs as one
  Triton kernel holding R, Z and Q on chip (`ns_gram.gram_segment`) instead of ~7 memory-bound
  batched GEMMs and pointwise passes; a no-op where it does not apply (fp16 small side, n <= 128,
  CUDA). On by default: graphed, the 20-layer step alone 24.50 -> 21.06 ms and the whole (a) train
  step 65.63 -> 62.02 ms (H200, 2026-12-03); eager steps are host-bound and read no slower with it
  (six readings, 26-52 ms either way). `gram_kernel=False` is the torch path, the kernel's reference.
- `stream_experts` (on; `STREAM_EXPERTS`): each expert tensor's step as `expert_muon`'s streaming kernels (momentum
  with the Gram R0; the n x n chain with its restart taken on the small side, R1 = Q1 R0 Q1^T near
  fp32; the update with Q as bf16 hi + lo parts and the kept bf16 copy: 24 bytes per parameter
  instead of ~36, three launches per tensor, and closer to a float64 iteration than the packed
  path), where they apply (CUDA, bf16 Newton-Schulz, fp32 weights); the packed path above
  elsewhere. H100, 2026-12-05, with the earlier form (restart from the big side, 28 bytes): the
  20-layer optimizer step alone 29.27 -> 27.73 ms (graphed), the (a) train step 61.19 -> 59.95 ms.
- AdamW: `torch._fused_adamw_` (one multi-tensor kernel per group) with the clip factor passed as
  its `grad_scale` and `step` kept as a device tensor; tensors of `ADAMW_ALONE` elements or more
  (the embedding and head) get a compiled update each (`_adamw_update`), which streams at a higher
  bandwidth than the multi-tensor kernel, and so does a tensor with a kept bf16 copy (the head's,
  `weight_copies`): its pass writes the copy, so the loss's forward does not cast the head, and so
  does a tensor with bf16 moments (`adamw_moments_dtype`: the multi-tensor kernel takes one dtype).
- Row gradients (`step(row_grads=...)`, `FastBody.embedding_row_grads`): after one backward the
  embedding's gradient is non-zero only on the step's tokens' rows, so it can come as those rows
  and a row map instead of a [V, d] tensor; its compiled AdamW gathers them in its one pass
  (`_adamw_rows_update`) and the norm sums their squares. No [V, d] gradient is written (~0.8 GB
  at V = 201,088: its zero fill) or read.
- Gradients held elsewhere (`step(grads=...)`, `FastBody.low_grads`): the expert weights'
  gradients can come in bf16 from their holders (graphed.LOW_GRADS); the momentum pass reads them
  (computing in fp32 as before), the norm takes their squares from the kernel after one backward
  and reads them (its sums in fp32) after more.
- Learning rates live in 0-dim device tensors (`lr_tensors`), so the whole step can be captured in a
  CUDA graph and still follow a schedule: `step()` refreshes them from `group["lr"]` (a device
  fill, no sync); a captured step reads them.
- On CPU (CI) the same code runs eagerly in fp32; DTensor (FSDP/EP) params are not handled here:
  `supported(opt)` says whether to use this or the reference step.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from vpmoe import ops
from vpmoe.train import expert_muon, ns_gram, ns_update
from vpmoe.train.ns_gram import bmm_f32
from vpmoe.train.optim import GRAM_RESTART_AT, NS_COEFFS, MuonAdamW, muon_scale, new_moments, new_momentum


# AdamW tensors at least this big (the embedding and head) get a compiled update of their own; the
# many small ones share `_fused_adamw_`'s multi-tensor launches
ADAMW_ALONE = 1 << 22
# `FastMuonAdamW(stream_experts=None)` takes this (on: the (a) step 52.80 -> 52.24 ms on an H200,
# 2026-12-05; 61.22 -> 58.55 ms on an H100, 2026-12-06)
STREAM_EXPERTS = True
HALF = (torch.bfloat16, torch.float16)  # gradients in these are widened to fp32 before any arithmetic
ORDERS = ("adamw_first", "muon_first")  # `FastMuonAdamW(order=)`: the AdamW jobs queued first or last


def newton_schulz_batched(x: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """`optim.newton_schulz` for a batch [b, m, n] already in the iteration dtype, with fewer passes
    over the big [b, m, n] operand (the [b, m, m] Gram-side work is small):
    - each iteration is X <- Q @ X with Q = a*I + b*G + c*G@G: one GEMM, no separate `a*X + ...`
      pass and no copy of X into a `baddbmm` accumulator; G@G comes out in fp32 and Q is one
      pointwise pass (a `baddbmm` would first copy G into its output: ~1 ms of device copies per
      (a) step with the Gram side's, profiled 2026-12-03);
    - the Frobenius normalisation comes from the first Gram matrix (||X||^2 = trace(X X^T)) and is
      folded into the first Q, so X is never divided in a separate pass;
    - for tall matrices the last product is taken transposed (X^T Q^T), so the result comes out
      contiguous in the parameter's own layout for the update kernel."""
    a, b, c = NS_COEFFS
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    eye = torch.eye(x.shape[-2], device=x.device, dtype=torch.float32)
    for i in range(steps):
        gram = torch.bmm(x, x.mT)
        if i == 0:
            norm = gram.diagonal(dim1=-2, dim2=-1).float().sum(-1).clamp_min(0).sqrt() + eps  # [b]
            gram = (gram.float() / norm[:, None, None] ** 2).to(x.dtype)
        q = bmm_f32(gram, gram) * c + gram.float() * b + a * eye
        if i == 0:
            q = q / norm[:, None, None]
        q = q.to(x.dtype)
        if transposed and i == steps - 1:
            return torch.bmm(x.mT, q.mT)
        x = torch.bmm(q, x)
    return x.mT if transposed else x


def _gram_f32(x: torch.Tensor) -> torch.Tensor:
    """x @ x^T with fp32 accumulation and fp32 (or fp64) output (`ns_gram.bmm_f32`)."""
    return bmm_f32(x, x.mT)


def gram_scale(r: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / (||X|| + eps) per matrix from its Gram matrix R = X X^T ([b, m, m]): ||X||^2 = trace(R)."""
    return 1.0 / (r.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt() + eps)


def gram_side(shape, method: str) -> bool:
    """Whether Newton-Schulz on matrices of `shape` (last two dims) iterates on the Gram side:
    asked for (`method` "gram") and at least 4x wider than tall (or taller than wide)."""
    short, long = sorted(shape[-2:])
    return method == "gram" and long >= 4 * short


def gram_newton_schulz(x: torch.Tensor, steps: int = 5, eps: float = 1e-7, restart_at: tuple[int, ...] = GRAM_RESTART_AT,
                       small_dtype: torch.dtype | None = None, kernel: bool = False) -> torch.Tensor:
    """`optim.newton_schulz` for a batch [b, m, n] (bf16 on CUDA), iterating on the small Gram side.

    Each quintic step is X <- Z X with Z = a*I + b*R + c*R^2 and R = X X^T. Z is a polynomial in R,
    so after steps 1..k, X_k = Q_k X_0 with Q_k = Z_k ... Z_1 and R_{k+1} = Z_k R_k Z_k: the big
    rectangular operand (here 128 x 1024 per expert) enters only the first Gram and the final Q X,
    and the iteration is n x n matrix products (n = the short side). Same result in exact
    arithmetic (fp64 test: equal to the reference); FLOPs per 128 x 1024 matrix 335M -> ~190M and
    two passes over X instead of ten. Half-precision Gram iterations can grow spurious negative
    eigenvalues (each step multiplies a negative one by ~a^2 = 12), so the iteration restarts
    (X <- Q X, R recomputed from X) before step `restart_at` (Dao lab's Gram Newton-Schulz, whose
    stabilised form restarts at step 2). The n x n side runs in fp16 on CUDA (11 mantissa bits vs
    bf16's 8; R's eigenvalues stay in [0, ~1.5] after the Frobenius normalisation, Q's norm <= a^3),
    the scale and the big products in bf16 (the input's range is arbitrary). `kernel`: each restart
    segment's n x n iteration as one Triton kernel where it applies (`ns_gram`; opt-in)."""
    return gram_newton_schulz_packed([x], steps, eps, restart_at, small_dtype, kernel)[0]


def gram_newton_schulz_packed(xs: list[torch.Tensor], steps: int = 5, eps: float = 1e-7,
                              restart_at: tuple[int, ...] = GRAM_RESTART_AT, small_dtype: torch.dtype | None = None,
                              kernel: bool = False) -> list[torch.Tensor]:
    """`gram_newton_schulz` of each x in xs (matrices of one shape, any batch sizes): the products
    over the big operand run per x, the n x n iteration once over all of them packed into one batch.
    At the experts' 128 x 128 that iteration is ~6 us launches of 256 tiles per tensor (two waves
    on an H200's 132 SMs: launch and ramp, not work, set their time), so packing several tensors
    makes fewer, fuller launches. The results equal per-x calls (the same math per matrix)."""
    qs, xs, transposed = gram_newton_schulz_parts(xs, steps, eps, restart_at, small_dtype, kernel)
    return [torch.bmm(x.mT, q.mT) if transposed else torch.bmm(q, x) for q, x in zip(qs, xs)]


def gram_newton_schulz_parts(xs: list[torch.Tensor], steps: int = 5, eps: float = 1e-7,
                             restart_at: tuple[int, ...] = GRAM_RESTART_AT, small_dtype: torch.dtype | None = None,
                             kernel: bool = False):
    """`gram_newton_schulz_packed` without its last product: (qs, xs, transposed) such that each
    result is Q X (its transpose when `transposed`), Q [b, m, m] and X [b, m, n] in x's dtype; for
    a caller that applies the product in its own kernel (`ns_update.qx_update`)."""
    a, b, c = NS_COEFFS
    transposed = xs[0].shape[-2] > xs[0].shape[-1]
    xs = [x.mT if transposed else x for x in xs]
    x0, sizes = xs[0], [x.shape[0] for x in xs]
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    small = small_dtype or (torch.float16 if x0.is_cuda else acc)

    def grams():
        rs = [_gram_f32(x) for x in xs]
        return rs[0] if len(rs) == 1 else torch.cat(rs)

    def per_x(q, scale):  # Q scaled back into each x's dtype, split by x
        q = (q.to(acc) * scale[:, None, None]).to(x0.dtype)
        return q.split(sizes) if len(xs) > 1 else (q,)

    r = grams()
    scale = gram_scale(r, eps)  # X_true = scale * x
    r = (r * scale[:, None, None] ** 2).to(small)
    bounds = [0, *sorted({i for i in restart_at if 0 < i < steps}), steps]  # restart segments
    q = None
    for s0, s1 in zip(bounds, bounds[1:]):
        if q is not None:  # restart: X <- Q X, R recomputed from it
            xs = [torch.bmm(qi, x) for qi, x in zip(per_x(q, scale), xs)]
            scale = torch.ones_like(scale)
            r = grams().to(small)
        if kernel and ns_gram.applies(r):
            q = ns_gram.gram_segment(r, s1 - s0, a, b, c)
        else:
            q = ns_gram.gram_segment_reference(r, s1 - s0, a, b, c)
    return list(per_x(q, scale)), xs, transposed


def orthogonalise(u: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """Batched Newton-Schulz [b, m, n] by `method`: "gram" for matrices at least 4x wider than tall
    (or taller than wide), where it saves work; the X-side iteration otherwise."""
    if gram_side(u.shape, method):
        return gram_newton_schulz(u, steps)
    return newton_schulz_batched(u, steps)


def _muon_pre(g, buf, coef, mu: float, nesterov: bool, out_dtype: torch.dtype):
    """buf <- mu * buf + coef * g (in place; computed in g's precision, at least fp32, rounded once
    where buf is narrower); returns the Nesterov (or plain) update from the unrounded momentum, in out_dtype."""
    g = (g.float() if g.dtype in HALF else g) * coef
    m = buf.to(g.dtype) * mu + g
    buf.copy_(m)
    u = g + mu * m if nesterov else m
    return u.to(out_dtype)


def _muon_post(w, ortho, decay, step, low=None):
    """w <- w * decay + step * ortho (decay = 1 - lr * wd, step = -lr * scale; 0-dim tensors); with
    `low`, also low <- w in low's dtype (a kept GEMM-dtype copy: one more store in the same kernel)."""
    w.mul_(decay).add_(ortho.to(w.dtype) * step)
    if low is not None:
        low.copy_(w)


def _muon_matrices(ps, grads, bufs, coef, mu: float, nesterov: bool, decay, step, steps: int, method: str,
                   ns_dtype: torch.dtype) -> list | None:
    """Muon on a list of same-shape 2-D matrices, in place: momentum and Nesterov as multi-tensor
    ops, one batched Newton-Schulz over the stacked updates, then w <- w * decay + step * ortho
    (decay None: no weight decay). Compiled on CUDA as one graph per shape: eager, these few
    hundred small tensors cost ~8 pointwise launches per Newton-Schulz iteration plus the stack,
    casts and updates. A narrower stored momentum (bf16) is not written here: the new momentum is
    returned unrounded and the caller stores it (`_store_momentum`, eager). Written inside the
    compiled graph (`_foreach_copy_` into the bf16 buffers), Inductor's CUDA combo kernel computed
    the Nesterov update as g + mu * (mu * m_new + g), the recurrence applied twice (the generated
    code of 2026-12-07; the GPU's whole-step test failed with it, the CPU's compiled code was right)."""
    scaled = torch._foreach_mul(grads, coef)
    if bufs[0].dtype == scaled[0].dtype:
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, scaled)
        ms, out = bufs, None
    else:
        ms = out = torch._foreach_add(torch._foreach_mul([b.to(s.dtype) for b, s in zip(bufs, scaled)], mu), scaled)
    upd = torch._foreach_add(scaled, ms, alpha=mu) if nesterov else ms
    ortho = orthogonalise(torch.stack(upd).to(ns_dtype), steps, method)
    # converted and scaled as one stacked tensor; its slices are views, added by one multi-tensor op
    ortho = ortho.to(ps[0].dtype) * step
    if decay is not None:
        torch._foreach_mul_(ps, decay)
    torch._foreach_add_(ps, ortho.unbind(0))
    return out


def _store_momentum(bufs: list, ms: list | None) -> None:
    """`_muon_matrices`' new momentum into the narrower stored buffers (one rounding), eagerly."""
    if ms is not None:
        torch._foreach_copy_(bufs, ms)


def _adamw_update(w, g, m, v, t, lr, coef, beta1: float, beta2: float, wd: float, eps: float,
                  low: torch.Tensor | None = None) -> None:
    """`MuonAdamW`'s AdamW on one tensor, in place, with the clip coefficient applied to g and the
    step count t (after this step) a 0-dim device tensor: one fused pass when compiled (the big
    embedding and head tensors: Inductor's pointwise kernel streams them faster than the
    multi-tensor `_fused_adamw_`, ~2.8 TB/s in the 09:12 profile). `low`: w's kept copy in a
    narrower dtype (`FastBody.use_weight_copies`: the head's), written in the same pass."""
    g = g * coef
    if m.dtype == g.dtype:
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    else:  # bf16 moments (`adamw_moments_dtype`): the recurrences in fp32, stored rounded, used unrounded
        m_new = m.to(g.dtype).lerp(g, 1 - beta1)
        v_new = v.to(g.dtype).mul(beta2).addcmul(g, g, value=1 - beta2)
        m.copy_(m_new)
        v.copy_(v_new)
        m, v = m_new, v_new
    denom = (v / (1 - beta2 ** t)).sqrt() + eps
    if wd:
        w.mul_(1 - lr * wd)
    w.add_(m / denom * (-lr / (1 - beta1 ** t)))
    if low is not None:
        low.copy_(w)


def _adamw_rows_update(w, rowmap, rows, m, v, t, lr, coef, beta1: float, beta2: float, wd: float,
                       eps: float, low: torch.Tensor | None = None) -> None:
    """`_adamw_update` with the gradient given as rows (`fast.embedding_rows`: row i of w's gradient
    is rows[rowmap[i]], or zero where rowmap[i] < 0). Compiled, the gather is part of the update's
    one pass, so no [V, d] gradient is ever written: the pass reads w, m and v (and the few rows),
    24 bytes per element against 28 with a dense fp32 gradient."""
    g = torch.where((rowmap >= 0)[:, None], rows[rowmap.clamp_min(0)], 0.0)
    _adamw_update(w, g, m, v, t, lr, coef, beta1, beta2, wd, eps, low)


def _grad_of(p: torch.Tensor, given: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """p's gradient: its `.grad`, or the one given apart for it (`FastMuonAdamW.step(grads=...)`)."""
    return p.grad if p.grad is not None else given.get(id(p))


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm (`_foreach_norm`), half-precision tensors' in fp32: in their own dtype
    the norm itself would be rounded to 8 or 11 bits."""
    half = [t for t in tensors if t.dtype in HALF]
    rest = [t for t in tensors if t.dtype not in HALF]
    return ([*torch._foreach_norm(rest)] if rest else []) + \
        ([*torch._foreach_norm(half, 2, dtype=torch.float32)] if half else [])


def streams_for(activation_checkpointing: bool | int) -> dict:
    """FastMuonAdamW keyword arguments for a run: one stream where blocks are checkpointed (memory is
    the constraint there: the streams' temporaries cannot share memory, +1.7 GiB reserved, and the
    one-H200 recipe's evaluation ran out), the default streams otherwise."""
    return {"streams": 1} if activation_checkpointing else {}


def supported(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, MuonAdamW) and not any(
        isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])


class FastMuonAdamW:
    def __init__(self, opt: MuonAdamW, max_grad_norm: float = 0.0, ns_chunk: int = 256,
                 compile: bool | None = None, ns_method: str = "gram", ns_pack: int = 4, streams: int = 3,
                 fuse_update: bool = False, gram_kernel: bool = True, stream_experts: bool | None = None,
                 order: str = "adamw_first"):
        if ns_method not in ("gram", "standard"):
            raise ValueError(f"ns_method: 'gram' or 'standard', got {ns_method!r}")
        if ns_pack < 1:
            raise ValueError(f"ns_pack: tensors per packed Newton-Schulz call, >= 1, got {ns_pack}")
        if streams < 1:
            raise ValueError(f"streams: CUDA streams the step's independent pieces spread over, >= 1, got {streams}")
        if not supported(opt):
            raise ValueError("FastMuonAdamW needs a MuonAdamW over plain (non-DTensor) parameters")
        self.opt, self.max_norm, self.ns_chunk, self.ns_pack = opt, float(max_grad_norm), int(ns_chunk), int(ns_pack)
        if order not in ORDERS:
            raise ValueError(f"order: one of {ORDERS} (the AdamW jobs queued first or last), got {order!r}")
        self.order = order
        p0 = opt.param_groups[0]["params"][0]
        self.device = p0.device
        self.side_streams = [torch.cuda.Stream(self.device) for _ in range(streams - 1)] if p0.is_cuda else []
        self.ns_dtype = torch.bfloat16 if p0.is_cuda else torch.float32
        self.lr_tensors = [torch.zeros((), device=self.device) for _ in opt.param_groups]
        use_compile = p0.is_cuda if compile is None else compile
        if use_compile:  # one graph per 2-D shape and per expert shape: above Dynamo's default of 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._pre = _Compiled(_muon_pre, use_compile)
        self._post = _Compiled(_muon_post, use_compile)
        self.ns_method = ns_method
        # the experts' Newton-Schulz: bmm + small pointwise work, fused around the GEMMs when compiled
        self._ns = _Compiled(orthogonalise, use_compile)
        self._ns_packed = _Compiled(gram_newton_schulz_packed, use_compile)
        # opt-in until measured: packed experts' update in the last product's epilogue (ns_update.py)
        self.fuse_update = bool(fuse_update)
        self._ns_parts = _Compiled(gram_newton_schulz_parts, use_compile)
        self.gram_kernel = bool(gram_kernel)  # each restart segment's n x n iteration as one kernel (ns_gram.py)
        # the experts' step as streaming kernels (expert_muon.py); None: the module's STREAM_EXPERTS
        self.stream_experts = STREAM_EXPERTS if stream_experts is None else bool(stream_experts)
        self._matrices = _Compiled(_muon_matrices, use_compile)  # the 2-D matrices, one graph per shape
        # AdamW tensors of >= ADAMW_ALONE elements or with a kept copy
        self._adamw_one = _Compiled(_adamw_update, use_compile)
        self._adamw_rows = _Compiled(_adamw_rows_update, use_compile)  # gradients given as rows (the embedding)
        # {id(param): its copy in the GEMM dtype} (`FastBody.use_weight_copies`): written with each update
        self.weight_copies: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ state

    def init_state(self) -> None:
        """Create every state tensor the step needs (before a CUDA-graph capture)."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                self._state(group, p)

    def _state(self, group, p):
        state = self.opt.state[p]
        if group["kind"] == "muon":
            if "momentum" not in state:
                state["momentum"] = new_momentum(p, group)
        else:
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = new_moments(p, group)
            if state["step"].device != p.device:  # the reference keeps it on the CPU
                state["step"] = state["step"].to(p.device)
        return state

    def refresh_lr(self) -> None:
        for t, group in zip(self.lr_tensors, self.opt.param_groups):
            t.fill_(group["lr"])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, refresh_lr: bool = True, known_sq: dict[int, torch.Tensor] | None = None,
             row_grads: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
             grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """One clipped step; returns the global gradient norm (a device tensor, before clipping).
        `known_sq` {id(param): partial sums of its gradient's squares} (`FastBody.known_grad_sq`):
        those gradients' part of the norm is the partials' sum, so they are not read for it.
        `row_grads` {id(param): (rowmap, rows)} (`FastBody.embedding_row_grads`): the gradient of an
        AdamW parameter whose `.grad` is None, as its non-zero rows (`fast.embedding_rows`).
        `grads` {id(param): gradient} (`FastBody.low_grads`): the gradients of Muon parameters whose
        `.grad` is None, in any float dtype (the experts' bf16 ones, taken by their holders)."""
        if refresh_lr:
            self.refresh_lr()
        row_grads, given = row_grads or {}, grads or {}
        self._check_apart(given, "muon", "a gradient given apart", "Muon parameters only (the experts)")
        self._check_apart(row_grads, "adamw", "row gradients", "AdamW parameters only (the embedding)")
        norm = self.grad_norm(known_sq or {}, row_grads, given)
        if self.max_norm > 0:
            coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        else:
            coef = torch.ones((), device=self.device)
        muon, adamw = [], []  # independent pieces of the step: their small scalar ops are queued while they are made
        for group, lr in zip(self.opt.param_groups, self.lr_tensors):
            if group["kind"] == "muon":
                muon += self._muon(group, lr, coef, given)
            elif group["kind"] == "adamw":
                adamw += self._adamw(group, lr, coef, row_grads)
            else:
                raise ValueError(f"unknown param group kind {group['kind']!r}")
        self._run(adamw + muon if self.order == "adamw_first" else muon + adamw)
        return norm

    def _check_apart(self, apart: dict, kind: str, what: str, whose: str) -> None:
        """Gradients given apart from `.grad` (`apart`, {id(param): ...}) are for the `kind` group's
        parameters only, and only for those whose `.grad` is None."""
        params = {id(p): p for g in self.opt.param_groups if g["kind"] == kind for p in g["params"]}
        if not apart.keys() <= params.keys():
            raise ValueError(f"FastMuonAdamW.step: {what}: for {whose}")
        if any(params[key].grad is not None for key in apart):
            raise ValueError(f"FastMuonAdamW.step: a parameter has both a .grad and {what}")

    def grad_norm(self, known_sq: dict[int, torch.Tensor],
                  row_grads: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  given: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The global gradient norm (fp32, on the device): `_foreach_norm` over the gradients (`.grad`,
        or `given` {id(param): gradient} where that is None), except those in `known_sq`, whose
        squares are already summed in parts (their L1 norm is their sum), and the row gradients'
        squares (`row_grads`: each non-zero row once)."""
        given = given or {}
        params = [p for g in self.opt.param_groups for p in g["params"] if _grad_of(p, given) is not None]
        grads = [_grad_of(p, given) for p in params if id(p) not in known_sq]
        parts = [known_sq[id(p)] for p in params if id(p) in known_sq]
        parts += [rows.float().square().sum(1) for _, rows in (row_grads or {}).values()]
        if not parts:
            return torch.linalg.vector_norm(torch.stack(_norms(grads)).float()) if grads else \
                torch.zeros((), device=self.device)
        sq = torch.stack(torch._foreach_norm(parts, 1)).float().sum()
        if grads:
            sq = sq + torch.stack(_norms(grads)).float().square().sum()
        return sq.sqrt()

    def _run(self, jobs) -> None:
        """Run the jobs in order, or spread round-robin over `streams` CUDA streams (forked from and
        joined back to the current one, so a CUDA-graph capture takes them as parallel branches)."""
        if not self.side_streams:
            for job in jobs:
                job()
            return
        main = torch.cuda.current_stream(self.device)
        streams = [main, *self.side_streams]
        for s in self.side_streams:
            s.wait_stream(main)
        try:
            for i, job in enumerate(jobs):
                with torch.cuda.stream(streams[i % len(streams)]):
                    job()
        finally:  # joined even when a job fails, so a capture reports that error, not an unjoined stream
            for s in self.side_streams:
                main.wait_stream(s)

    def _muon(self, group, lr, coef, given: dict) -> list:
        """The group's jobs (closures for `_run`): one per expert tensor or pack, one per 2-D shape
        (and chunk); the scalars they share are computed here, on the current stream. `given`: the
        gradients of parameters whose `.grad` is None (`step(grads=...)`)."""
        mu, nesterov, wd, steps = group["momentum"], group["nesterov"], group["weight_decay"], group["ns_steps"]
        decay, neg_lr = 1 - lr * wd, -lr  # 0-dim tensors, made once: every op on them is a kernel
        flat2d, packs, jobs = defaultdict(list), defaultdict(list), []
        for p in group["params"]:
            grad = _grad_of(p, given)
            if grad is None:
                continue
            buf = self._state(group, p)["momentum"]
            if p.ndim == 2:
                flat2d[(tuple(p.shape), p.dtype)].append((p, grad, buf))
                continue
            step = neg_lr * muon_scale(p.shape)
            g, w = grad.view(-1, *p.shape[-2:]), p.view(-1, *p.shape[-2:])
            buf = buf.view(-1, *p.shape[-2:])
            low = self.weight_copies.get(id(p))
            low = None if low is None else low.view(-1, *p.shape[-2:])
            if self._streams(w):
                jobs.append(lambda g=g, buf=buf, w=w, step=step, low=low: expert_muon.muon_step(
                    g, buf, w, low, coef, mu, nesterov, decay, step, steps, gram_kernel=self.gram_kernel))
                continue
            if self._packs(g):
                packs[(tuple(g.shape[-2:]), p.dtype)].append((g, buf, w, step, low))
                continue

            def chunks(g=g, buf=buf, w=w, step=step, low=low):
                for c0 in range(0, g.shape[0], self.ns_chunk):
                    c1 = min(c0 + self.ns_chunk, g.shape[0])
                    u = self._pre(g[c0:c1], buf[c0:c1], coef, mu, nesterov, self.ns_dtype)
                    self._post(w[c0:c1], self._ns(u, steps, self.ns_method), decay, step,
                               None if low is None else low[c0:c1])
            jobs.append(chunks)
        for items in packs.values():  # whole tensors, `ns_pack` per Newton-Schulz call
            for c0 in range(0, len(items), self.ns_pack):
                def packed(pack=items[c0:c0 + self.ns_pack]):
                    us = [self._pre(g, buf, coef, mu, nesterov, self.ns_dtype) for g, buf, _, _, _ in pack]
                    w0 = pack[0][2]
                    if self.fuse_update and ns_update.applies(w0.device, self.ns_dtype, w0.dtype, min(w0.shape[-2:])):
                        qs, xs, transposed = self._ns_parts(us, steps, kernel=self.gram_kernel)
                        for (_, _, w, step, low), q, x in zip(pack, qs, xs):
                            ns_update.qx_update(w, q, x, decay, step, transposed, low)
                        return
                    for (_, _, w, step, low), ortho in zip(pack, self._ns_packed(us, steps, kernel=self.gram_kernel)):
                        self._post(w, ortho, decay, step, low)
                jobs.append(packed)
        for (shape, _), items in flat2d.items():
            ps, gs, bufs = [p for p, _, _ in items], [g for _, g, _ in items], [b for _, _, b in items]
            step = neg_lr * muon_scale(shape)
            for c0 in range(0, len(ps), max(1, self.ns_chunk)):
                sl = slice(c0, c0 + max(1, self.ns_chunk))
                jobs.append(lambda ps=ps[sl], gs=gs[sl], bufs=bufs[sl], step=step: _store_momentum(bufs, self._matrices(
                    ps, gs, bufs, coef, mu, nesterov, decay if wd else None, step, steps,
                    self.ns_method, self.ns_dtype)))
        return jobs

    def _streams(self, w: torch.Tensor) -> bool:
        """Whether an expert tensor's step runs as `expert_muon`'s streaming kernels: asked for, bf16
        Newton-Schulz on the Gram side (`gram_side`) and kernels that apply."""
        return (self.stream_experts and self.ns_dtype == torch.bfloat16 and gram_side(w.shape, self.ns_method)
                and expert_muon.applies(w.device, w.dtype, min(w.shape[-2:])))

    def _packs(self, g: torch.Tensor) -> bool:
        """Whether a 3-D tensor goes through the packed Gram-side call: asked for (`ns_pack` > 1),
        whole tensors per chunk, and matrices the Gram-side iteration takes (`gram_side`)."""
        return self.ns_pack > 1 and g.shape[0] <= self.ns_chunk and gram_side(g.shape, self.ns_method)

    def _adamw(self, group, lr, coef, rowed: dict) -> list:
        """The group's jobs: one per tensor whose gradient comes as rows (`rowed`) and per big tensor
        (`ADAMW_ALONE`), one `_fused_adamw_` per dtype for the rest; the step counts advance here,
        on the current stream."""
        ps = [p for p in group["params"] if p.grad is not None or id(p) in rowed]
        if not ps:
            return []
        states = [self._state(group, p) for p in ps]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        by_dtype, jobs = defaultdict(list), []
        for p, s, t in zip(ps, states, steps):
            low = self.weight_copies.get(id(p))  # a kept copy (the head's) is written in the tensor's own pass
            if id(p) in rowed:
                jobs.append(lambda p=p, s=s, t=t, low=low: self._adamw_rows(
                    p, *rowed[id(p)], s["exp_avg"], s["exp_avg_sq"], t, lr, coef, beta1, beta2,
                    group["weight_decay"], group["eps"], low))
            elif p.numel() >= ADAMW_ALONE or low is not None or s["exp_avg"].dtype != p.dtype:
                jobs.append(lambda p=p, s=s, t=t, low=low: self._adamw_one(
                    p, p.grad, s["exp_avg"], s["exp_avg_sq"], t, lr, coef, beta1, beta2, group["weight_decay"],
                    group["eps"], low))
            else:
                by_dtype[p.dtype].append((p, s, t))

        def adamw(items):
            torch._fused_adamw_([p for p, _, _ in items], [p.grad for p, _, _ in items],
                                [s["exp_avg"] for _, s, _ in items], [s["exp_avg_sq"] for _, s, _ in items], [],
                                [t for _, _, t in items], lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                maximize=False, grad_scale=1.0 / coef, found_inf=None)
        return jobs + [lambda items=items: adamw(items) for items in by_dtype.values()]


class _Compiled:
    """torch.compile'd on first use where asked; eager forever after any compile failure."""

    def __init__(self, fn, use_compile: bool):
        self.fn = fn
        self.compiled = ops.salted_compile(fn, dynamic=False) if use_compile else None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - eager is always correct
                warnings.warn(f"optim_fast: compiling {self.fn.__name__} failed ({e!r:.300}); eager from now")
                self.compiled = None
        return self.fn(*args, **kwargs)

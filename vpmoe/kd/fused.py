"""Fused, chunked CE/KD losses from hidden states and the head weight, never holding [N, V].

Design choices:
- Same contract and math as the materialised reference `vpmoe.kd.losses.span_loss_reference`
  (see that module for the definitions); this file is only about doing it in bounded memory.
- Only supervised rows (span 1 or 2) are computed. They are processed in token chunks of
  `chunk_size` rows with the full vocabulary per chunk ([C, V] logits, C ~ 512 for bf16 at
  V = 201088, i.e. ~200 MB), which keeps the two big matmuls large and needs no vocab-chunked
  online softmax.
- Gradients are computed in the forward pass (as Liger's fused linear CE does): per chunk,
  logits -> per-token loss and d loss / d logits -> grad_hidden rows and grad_weight
  accumulation. Three matmuls per chunk instead of four (no recompute in backward); backward
  only scales the stored gradients by the incoming scalar. When no gradient is needed
  (eval, no_grad) the gradient work is skipped.
- CE and every sparse-target loss depend on the student logits z only through z at a few ids
  (the label and the K known ids) and R = logsumexp of z over the *other* ids. So per chunk the
  vocab-wide work is: gather, write -inf at the K ids, one row logsumexp, and one elementwise
  pass `exp(z - R) * dF/dR` (in place: the logits chunk becomes its gradient), plus scatters of
  dF/d(gathered values). The small [C, K + 1] problem F (a softmax over [z at the ids, R]) is
  solved in closed form. R is computed exactly (masked), never as `log(1 - sum of known
  probs)`, which cancels catastrophically when the rest mass is small.
- Dense targets use explicit gradient formulas per divergence over full rows (smaller chunks).
- On CUDA the two vocab-wide passes (row logsumexp, the in-place rest gradient) are Triton kernels
  (`vpmoe.kd.row_kernels`, 3.0-3.9 TB/s on an H200); the other row functions are compiled with
  torch.compile (fused upcast + reduce / elementwise, bf16 in and out, fp32 math); anything
  failing to compile falls back to eager. Set VPMOE_KD_COMPILE=0 to disable compilation. Math is
  fp32 (fp64 when the inputs are fp64).
- grad_weight accumulates in the head weight's dtype (bf16 weights accumulate in bf16, as Liger;
  an fp32 master head under bf16 compute in fp32, inside the GEMM on CUDA).
- `static=True`: no host synchronisation and no data-dependent shape in forward or backward, so
  the whole train step can be captured in one CUDA graph. All N rows are computed (chunk bounds
  depend only on N): unsupervised rows (span 0) get coefficient 0, label 0 and a harmless sparse
  target (ids 0..K-1, log-probs 0), so they add exactly 0 to the loss, gradients (their
  grad_hidden rows are 0) and stats. The shared span bookkeeping (`losses.count_span_tokens`,
  `span_coefficients`, `stats_from_rows`) is sync-free for both forms; no
  constant is copied from the host. The price: N rows of work instead of M, and no validation
  that needs the data (span ids in {0, 1, 2}, labels and target ids of supervised rows in range):
  the caller validates (the data loader does). Sparse targets must have N rows; dense targets are
  refused. cwce with cwce_center None: the mean teacher label log-prob is computed on the device.
- `kd_gate` (static only): a 0-d device tensor that turns one captured KD loss into the CE loss of a
  CE step (gate 0: token loss = CE, the KD stats are 0) or the configured mix (gate 1), so one
  CUDA graph serves both kinds of step of a stage-2 run. Gate 0 still gathers the (dummy) target,
  a [N, K] side cost next to the vocabulary-wide passes.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from vpmoe import ops
from vpmoe.kd import row_kernels as RK
from vpmoe.kd.losses import (STAT_KEYS, TEACHER_LOGP_FLOOR, DenseTarget, LossSpec, SparseTarget,
                             check_inputs, check_shapes, check_target, count_span_tokens, span_coefficients,
                             stat_keys, stats_from_rows)

CHUNK_BYTES = 256 * 2**20  # budget for one [C, V] logits chunk in the compute dtype
# on a GPU a bigger chunk pays: each chunk's grad_weight GEMM reads and writes the whole [V, d]
# head gradient, so fewer chunks move less (measured on an H200 at 4096 tokens, bench/RESULTS.md:
# 512 rows 15.0 ms, 2048 rows 13.7 ms, 4096 rows 13.4 ms); 1 GiB = 2048 rows at V = 201088 bf16
CUDA_CHUNK_BYTES = 2**30
# with no activation checkpointing the step keeps every block's activations, and a chunk twice that
# is a small share of its peak: 2 GiB = 4096 rows, one chunk at (a)'s 2 x 2048 tokens (-0.16 ms on
# an H100, -0.19 on an H200, bench/RESULTS.md 2026-12-06). Checkpointed runs are the memory-tight
# ones, so they keep 1 GiB. The caller says which (`kept`): the loss cannot tell.
CUDA_KEPT_CHUNK_BYTES = 2**31
NEG_INF = float("-inf")
_KD_ROWS = ("kd_sum", "kl_sum", "teacher_logp_sum")  # per-token quantities a CE step does not report


def auto_chunk_size(vocab: int, dtype: torch.dtype, dense: bool, cuda: bool = False, kept: bool = False) -> int:
    """Largest power-of-two row count whose [C, V] logits fit the byte budget (a quarter for dense);
    `kept`: on CUDA, the step keeps every block's activations (CUDA_KEPT_CHUNK_BYTES)."""
    budget = (CUDA_KEPT_CHUNK_BYTES if kept else CUDA_CHUNK_BYTES) if cuda else CHUNK_BYTES
    rows = budget // (vocab * dtype.itemsize) // (4 if dense else 1)
    return 1 << int(math.log2(max(16, rows)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- vocab-wide row functions

def _row_lse(z: torch.Tensor) -> torch.Tensor:
    """Row logsumexp: the Triton kernel where it serves (CUDA), else compiled/eager torch."""
    return RK.row_lse(z) if RK.kernels_serve(z) else _fast(RK.row_lse_reference, z)


def _rest_grad_(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """z <- scale * exp(z - lse) per row, in place (the logits chunk becomes its gradient; entries
    at -inf give exactly 0): the Triton kernel where it serves, else compiled/eager torch."""
    if RK.kernels_serve(z, lse):
        return RK.rest_grad_(z, lse, scale)
    return _fast(RK.rest_grad_reference_, z, lse, scale)


def _divergence_and_grad(zs, t_logp, valid, kind: str, temp: float, beta: float):
    """D(teacher, student) per row and dD/dzs, for student logits zs [C, n] and teacher log-probs
    t_logp [C, n] (any normalisation), both tempered by `temp` and renormalised over the valid
    entries (valid: bool [C, n] or None = all). Explicit formulas: the softmax Jacobian applied
    to dD/dq gives q * (h - <q, h>) with h = dD/dq."""
    u, t = zs / temp, t_logp / temp
    if valid is not None:
        u, t = u.masked_fill(~valid, NEG_INF), t.masked_fill(~valid, NEG_INF)
    lq = u - torch.logsumexp(u, -1, keepdim=True)
    lp = t - torch.logsumexp(t, -1, keepdim=True)
    if valid is not None:  # invalid entries: probability 0, finite logs (no inf - inf)
        lq, lp = torch.where(valid, lq, 0.0), torch.where(valid, lp, 0.0)
        q, p = torch.where(valid, lq.exp(), 0.0), torch.where(valid, lp.exp(), 0.0)
    else:
        q, p = lq.exp(), lp.exp()
    if kind == "fkl":
        return (p * (lp - lq)).sum(-1), (q - p) / temp
    if kind == "rkl":
        h = lq - lp
        div = (q * h).sum(-1)
    elif kind == "jsd":
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        div = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
        h = (1 - beta) * (lq - lm)
    elif kind == "tvd":  # sign(0) = 0 is the subgradient at ties
        div = 0.5 * (p - q).abs().sum(-1)
        h = 0.5 * torch.sign(q - p)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return div, q * (h - (q * h).sum(-1, keepdim=True)) / temp


def _kd_term(kind, ce, t_lab, center, temp, scale, cw_min, cw_max, div_and_grad):
    """(kd per token, its gradient wrt the divergence's student logits or None, cwce weight or 0)."""
    if kind == "cwce":
        weight = torch.exp((t_lab - center) / temp).clamp(cw_min, cw_max)
        return weight * ce, None, weight
    div, grad = div_and_grad()
    return scale * div, scale * grad, torch.zeros_like(ce)


def _dense_rows(zs, zt, labels, coef, center, kind: str, temp: float, beta: float, alpha: float,
                scale: float, cw_min: float, cw_max: float, need_grad: bool):
    """Per-token loss pieces and d(sum coef * loss)/d zs for full student/teacher rows."""
    acc = _acc(zs.dtype)
    zs, zt = zs.to(acc), zt.to(acc)
    ls1, lt1 = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ce = -ls1.gather(1, labels[:, None]).squeeze(1)
    t_lab = lt1.gather(1, labels[:, None]).squeeze(1)
    kl = (lt1.exp() * (lt1 - ls1)).sum(-1)
    kd, g_kd, weight = _kd_term(kind, ce, t_lab, center, temp, scale, cw_min, cw_max,
                                lambda: _divergence_and_grad(zs, lt1, None, kind, temp, beta))
    loss = (1 - alpha) * kd + alpha * ce
    grad = None
    if need_grad:  # CE (and cwce, a weighted CE) contribute softmax(zs) - onehot(label)
        ce_coef = alpha + (1 - alpha) * weight
        grad = ce_coef[:, None] * ls1.exp()
        if g_kd is not None:
            grad = grad + (1 - alpha) * g_kd
        grad = grad * coef[:, None]
        grad.scatter_add_(1, labels[:, None], (-ce_coef * coef)[:, None])
    return {"loss_sum": loss, "ce_sum": ce, "kd_sum": kd, "kl_sum": kl, "teacher_logp_sum": t_lab}, grad


def _sparse_rows(g_lab, g_ids, rest, valid, t_lp, t_rest, t_lab, coef, center, kind: str, mode: str,
                 temp: float, beta: float, alpha: float, scale: float, cw_min: float, cw_max: float):
    """The small per-token problem of a sparse target, solved in closed form.

    Student logits over K + 1 coarse categories: x = [z at the known ids, R] (R = logsumexp of z
    outside them), so lse(x) = lse(z), coarse log-probs = log_softmax(x), CE = lse(x) - z[label].
    'renorm' restricts the divergence to the K ids. Returns (rows, dF/dz[label] [C],
    dF/dx [C, K + 1]) for F = sum coef * loss."""
    ones = torch.ones_like(valid[:, :1])
    cat_valid = torch.cat([valid, ones], 1)
    x = torch.cat([g_ids, rest[:, None]], 1).masked_fill(~cat_valid, NEG_INF)
    ce = torch.logsumexp(x, -1) - g_lab
    tl = torch.cat([t_lp, t_rest[:, None]], 1).clamp_min(TEACHER_LOGP_FLOOR)
    kd_valid = cat_valid if mode == "tail" else torch.cat([valid, ~ones], 1)
    kl, _ = _divergence_and_grad(x, tl, kd_valid, "fkl", 1.0, 0.5)
    kd, g_kd, weight = _kd_term(kind, ce, t_lab, center, temp, scale, cw_min, cw_max,
                                lambda: _divergence_and_grad(x, tl, kd_valid, kind, temp, beta))
    loss = (1 - alpha) * kd + alpha * ce
    ce_coef = alpha + (1 - alpha) * weight
    grad_x = ce_coef[:, None] * torch.softmax(x, -1)
    if g_kd is not None:
        grad_x = grad_x + (1 - alpha) * g_kd
    rows = {"loss_sum": loss, "ce_sum": ce, "kd_sum": kd, "kl_sum": kl}
    if t_lab is not None:
        rows["teacher_logp_sum"] = t_lab
    return rows, -ce_coef * coef, grad_x * coef[:, None]


_COMPILED: dict = {}


def _fast(fn, *args, **kwargs):
    """Run fn compiled on CUDA (once per function; eager fallback on any compile failure)."""
    if not args[0].is_cuda or os.environ.get("VPMOE_KD_COMPILE", "1") == "0":
        return fn(*args, **kwargs)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = ops.salted_compile(fn, dynamic=True)
    if compiled is not False:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any inductor failure: eager is always correct
            warnings.warn(f"vpmoe.kd.fused: torch.compile of {fn.__name__} failed ({e!r}); using eager")
            _COMPILED[fn] = False
    return fn(*args, **kwargs)


def _sparse_chunk(z, labels, tgt, coef, spec, center, need_grad, alpha=None):
    """z: this chunk's logits [C, V] (owned; overwritten, then returned as grad_z). `alpha`: the CE
    share (default spec.ce_weight; a 0-d tensor under a KD gate)."""
    acc = _acc(z.dtype)
    lab = labels[:, None]
    g_lab = z.gather(1, lab).squeeze(1).to(acc)
    if tgt is None:  # plain CE: loss = lse(z) - z[label], grad = softmax(z) - onehot(label)
        lse = _row_lse(z)
        ce = lse - g_lab
        rows = {"loss_sum": ce, "ce_sum": ce}
        if not need_grad:
            return rows, None
        grad_z = _rest_grad_(z, lse, coef)
        grad_z.scatter_add_(1, lab, (-coef)[:, None].to(z.dtype))
        return rows, grad_z
    valid = tgt.ids >= 0
    ids = torch.where(valid, tgt.ids, tgt.ids[:, :1])  # padding repeats slot 0 (harmless)
    g_ids = z.gather(1, ids).to(acc)
    z.scatter_(1, ids, NEG_INF)
    rest = _row_lse(z)
    t_lab = None if tgt.label_logprob is None else tgt.label_logprob.to(acc)
    rows, d_lab, d_x = _fast(_sparse_rows, g_lab, g_ids, rest, valid, tgt.logprobs.to(acc),
                             tgt.rest_logmass.to(acc), t_lab, coef, center, spec.kind, spec.sparse_mode,
                             spec.temperature, spec.beta, spec.ce_weight if alpha is None else alpha,
                             spec.kd_scale, spec.cwce_min,
                             spec.cwce_max)
    if not need_grad:
        return rows, None
    # dF/dz_v = dF/dR * exp(z_v - R) outside the known ids (exp(-inf) = 0 at them), plus the gathers
    grad_z = _rest_grad_(z, rest, d_x[:, -1].contiguous())
    grad_z.scatter_add_(1, ids, torch.where(valid, d_x[:, :-1], 0.0).to(z.dtype))
    grad_z.scatter_add_(1, lab, d_lab[:, None].to(z.dtype))
    return rows, grad_z


def _dense_chunk(z, t_logits, labels, coef, spec, center, need_grad):
    return _fast(_dense_rows, z, t_logits, labels, coef, center, spec.kind, spec.temperature, spec.beta,
                 spec.ce_weight, spec.kd_scale, spec.cwce_min, spec.cwce_max, need_grad)


def _teacher_logits(target: DenseTarget, r0: int, r1: int) -> torch.Tensor:
    if target.logits is not None:
        return target.logits[r0:r1]
    return target.hidden[r0:r1] @ target.head_weight.to(target.hidden.dtype).T


def _cwce_center_static(spec: LossSpec, target, span_id, dtype, device) -> torch.Tensor:
    """The cwce m as a 0-d device tensor without a host sync (sparse targets with N rows only):
    the masked mean of the teacher label log-prob over supervised rows (0 if there are none)."""
    if spec.kind != "cwce" or spec.cwce_center is not None:
        return torch.full((), spec.cwce_center or 0.0, dtype=dtype, device=device)
    sup = span_id > 0
    total = torch.where(sup, target.label_logprob.double(), 0.0).sum()
    return (total / sup.sum().clamp_min(1)).to(dtype)


def _static_sparse_target(target: SparseTarget, sup: torch.Tensor) -> SparseTarget:
    """Unsupervised rows (sup False) get ids 0..K-1 and log-probs 0: finite, in range, whatever
    the caller stored there (e.g. -1 padding everywhere); their coefficient is 0 anyway."""
    k = target.ids.shape[1]
    m = sup[:, None]
    ids = torch.where(m, target.ids, torch.arange(k, dtype=target.ids.dtype, device=target.ids.device))
    lab = None if target.label_logprob is None else torch.where(sup, target.label_logprob, 0.0)
    return SparseTarget(ids, torch.where(m, target.logprobs, 0.0), torch.where(sup, target.rest_logmass, 0.0), lab)


def _check_static(hidden, head_weight, labels, span_id, spec: LossSpec, target) -> None:
    """Shape checks only (Python ints): static mode never reads the data on the host."""
    n = check_shapes(hidden, head_weight, labels, span_id)
    if spec.kind == "ce":
        return
    check_target(spec, target, head_weight.shape[0])
    if isinstance(target, DenseTarget):
        raise ValueError("fused_span_loss(static=True) supports sparse targets only (a dense target "
                         "would be computed for every position); use static=False")
    if target.rows != n:
        raise ValueError(f"fused_span_loss(static=True): the sparse target needs N={n} rows (one per "
                         f"position), got {target.rows}")
    k = target.ids.shape[1]
    if (target.ids.shape != (n, k) or target.logprobs.shape != (n, k) or target.rest_logmass.shape != (n,)
            or (target.label_logprob is not None and target.label_logprob.shape != (n,))):
        raise ValueError("sparse target: expected ids/logprobs [N, K], rest_logmass and label_logprob [N]")


def _cwce_center(spec: LossSpec, target, labels_sel, chunk: int) -> float:
    """m of the cwce weight: the configured constant or the mean teacher label log-prob."""
    if spec.kind != "cwce" or spec.cwce_center is not None:
        return spec.cwce_center or 0.0
    if labels_sel.numel() == 0:
        return 0.0
    if isinstance(target, SparseTarget):
        return float(target.label_logprob.double().mean())
    total = 0.0
    for r0 in range(0, labels_sel.numel(), chunk):
        t = _teacher_logits(target, r0, r0 + chunk)
        t = t.to(_acc(t.dtype))
        lab = labels_sel[r0:r0 + chunk, None]
        total += float((t.gather(1, lab).squeeze(1) - torch.logsumexp(t, -1)).double().sum())
    return total / labels_sel.numel()


def _accumulate_grad_weight(grad_weight: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor,
                           first: bool = False) -> None:
    """grad_weight += grad_z^T h, or with `first` grad_weight = grad_z^T h (its old contents are
    never read: the buffer needs no zero fill, a [V, d] pass of its own; ~0.2 ms at V = 201088 in
    fp32 on an H200, 2026-12-04). A wider accumulator than the compute dtype (the fp32 master head
    under bf16 compute) takes the product in its own dtype: on CUDA one GEMM with fp32 output
    accumulating in its epilogue (`addmm(out_dtype=)`), no [V, d] product rounded to bf16 and then
    cast-added in a second pass (~2 GB of traffic per chunk at V = 201088, by byte count);
    elsewhere (the CPU has no `out_dtype` kernel) the product is computed, then cast and added."""
    beta = 0 if first else 1  # beta 0: the output is not read (NaN in it does not propagate)
    if grad_weight.dtype == grad_z.dtype:
        grad_weight.addmm_(grad_z.T, h, beta=beta)
    elif grad_weight.is_cuda and grad_weight.dtype == torch.float32 and grad_z.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(grad_weight, grad_z.T, h, beta=beta, out_dtype=torch.float32, out=grad_weight)
    elif first:
        grad_weight.copy_(grad_z.T @ h)
    else:
        grad_weight += (grad_z.T @ h).to(grad_weight.dtype)


class _FusedSpanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, plan: "_Plan"):
        sel, labels, target, spec, chunk, need_grad = (plan.sel, plan.labels, plan.target, plan.spec,
                                                      plan.chunk, plan.need_grad)
        cdtype = hidden.dtype
        w = weight.to(cdtype) if plan.head_low is None else plan.head_low
        h_sel = hidden if sel is None else hidden[sel]  # static: all N rows
        coef = plan.coef.to(_acc(cdtype))
        if sel is None:
            center = _cwce_center_static(spec, target, plan.span_sel, coef.dtype, hidden.device)
        else:
            center = torch.tensor(_cwce_center(spec, target, labels, chunk), dtype=coef.dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_grad and plan.grad_hidden else None
        rows_n = h_sel.shape[0]
        # the first chunk's GEMM writes the head gradient (no zero fill); no rows: it is 0
        grad_weight = ((torch.empty_like if rows_n else torch.zeros_like)(weight)
                       if need_grad and plan.grad_weight else None)
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        gate = plan.kd_gate
        alpha = None
        if gate is not None:  # gate 1: the configured CE share; gate 0: all CE
            gate = gate.to(coef.dtype)
            alpha = 1.0 - gate * (1.0 - spec.ce_weight)
        sums = {k: [] for k in STAT_KEYS}
        for r0 in range(0, rows_n, chunk):
            r1 = min(r0 + chunk, rows_n)
            h = h_sel[r0:r1]
            z = h @ w.T
            if isinstance(target, DenseTarget):
                tz = _teacher_logits(target, r0, r1)
                rows, grad_z = _dense_chunk(z, tz, labels[r0:r1], coef[r0:r1], spec, center, need_grad)
            else:
                tgt = None if target is None else target.select(slice(r0, r1))
                rows, grad_z = _sparse_chunk(z, labels[r0:r1], tgt, coef[r0:r1], spec, center, need_grad, alpha)
                if gate is not None:  # a CE step reports no KD quantities (as a plain CE call)
                    rows = {k: v * gate if k in _KD_ROWS else v for k, v in rows.items()}
            del z
            loss += (coef[r0:r1] * rows["loss_sum"]).sum().double()
            for k in STAT_KEYS:
                sums[k].append(rows.get(k))
            if grad_z is not None:
                grad_z = grad_z.to(cdtype)
                if grad_hidden is not None and sel is None:
                    grad_hidden[r0:r1] = grad_z @ w  # span-0 rows: exactly 0 (coefficient 0)
                elif grad_hidden is not None:
                    grad_hidden.index_copy_(0, sel[r0:r1], grad_z @ w)
                if grad_weight is not None:
                    _accumulate_grad_weight(grad_weight, grad_z, h, first=r0 == 0)
        ctx.grads = (grad_hidden, grad_weight)
        stat_rows = {k: torch.cat(v) for k, v in sums.items() if v and v[0] is not None}
        stats = stats_from_rows(plan.span_sel, stat_rows, plan.keys)
        packed = torch.stack([stats[k] for k in plan.keys])
        ctx.mark_non_differentiable(packed)
        return loss.to(_acc(cdtype)), packed

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # computed in forward; scaled in place (backward runs once)
        # by the 0-d grad_loss with no host read; on CUDA untouched when it is 1, as the trainer's is
        gh = RK.scale_unless_one_(grad_hidden, grad_loss) if ctx.needs_input_grad[0] else None
        gw = RK.scale_unless_one_(grad_weight, grad_loss) if ctx.needs_input_grad[1] else None
        return gh, gw, None


@dataclass
class _Plan:
    """Everything forward needs besides the two differentiable inputs (rows = supervised only, or
    all N rows in static mode)."""

    sel: torch.Tensor | None  # [M] supervised row indices into hidden; None = all N rows (static)
    span_sel: torch.Tensor  # [M] their span ids ([N] static)
    labels: torch.Tensor  # [M] ([N] static, span-0 rows set to 0)
    coef: torch.Tensor  # [M] w_span / n_span ([N] static, span-0 rows 0)
    target: SparseTarget | DenseTarget | None  # M rows (N static)
    spec: LossSpec
    chunk: int
    need_grad: bool
    grad_hidden: bool  # which gradients to produce
    grad_weight: bool
    keys: tuple[str, ...]  # the stats this call reports (losses.stat_keys)
    kd_gate: torch.Tensor | None = None  # static KD only: 0-d, 1 = KD step, 0 = CE step
    head_low: torch.Tensor | None = None  # the head already in hidden's dtype (a kept copy), else cast here


def fused_span_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                    span_id: torch.Tensor, spec: LossSpec, target=None, w_r: float = 1.0,
                    w_f: float = 1.0, chunk_size: int | None = None,
                    span_token_counts: torch.Tensor | None = None, static: bool = False,
                    kd_gate: torch.Tensor | None = None, head_low: torch.Tensor | None = None):
    """Span-normalised CE/KD loss from hidden [N, d] and head [V, d]; returns (loss, stats).

    `target`: SparseTarget / DenseTarget with N rows or M rows (supervised positions only, in
    order). `span_token_counts` ([3], index = span id): normalisers for the whole global batch
    (default: this call's counts). `stats`: per-span (index = span id) detached float64 sums of
    loss/ce/kd/kl/teacher_logp and int64 `count`; see `vpmoe.kd.losses.span_means`.

    `static=True`: no host sync and no data-dependent shapes (CUDA-graph capturable; see the module
    docstring). Only shapes are checked: span ids must be in {0, 1, 2} and supervised labels /
    target ids in range (the caller validates); targets must be sparse with N rows;
    `span_token_counts`, if given, should be a device tensor. `kd_gate` (static, sparse KD only):
    a 0-d device tensor, 1 for the configured KD loss, 0 for plain CE (module docstring).

    `head_low`: `head_weight` already in hidden's dtype (`FastBody.head_low()`, the copy the
    optimizer writes with each update), used in place of casting the head in each call; the
    gradient still goes to `head_weight`. The caller keeps it equal to the cast (only its shape
    and dtype are checked).
    """
    if head_low is not None and (head_low.shape != head_weight.shape or head_low.dtype != hidden.dtype):
        raise ValueError(f"fused_span_loss: head_low must be head_weight's shape {tuple(head_weight.shape)} in "
                         f"hidden's dtype {hidden.dtype}; got {tuple(head_low.shape)} {head_low.dtype}")
    if static:
        return _fused_span_loss_static(hidden, head_weight, labels, span_id, spec, target, w_r, w_f,
                                       chunk_size, span_token_counts, kd_gate, head_low)
    if kd_gate is not None:
        raise ValueError("fused_span_loss: kd_gate is for static=True (choose spec and target per call otherwise)")
    sel = check_inputs(hidden, head_weight, labels, span_id, spec, target)
    counts = count_span_tokens(span_id) if span_token_counts is None else span_token_counts
    span_sel = span_id[sel]
    coef = span_coefficients(span_sel, w_r, w_f, counts)
    if spec.kind == "ce":
        target = None
    elif target.rows != sel.numel():
        target = target.select(sel)
    dense = isinstance(target, DenseTarget)
    chunk = chunk_size or auto_chunk_size(head_weight.shape[0], hidden.dtype, dense, hidden.is_cuda)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    plan = _Plan(sel, span_sel, labels[sel], coef, target, spec, chunk, need_grad, hidden.requires_grad,
                 head_weight.requires_grad, stat_keys(spec, target), head_low=head_low)
    loss, packed = _FusedSpanLoss.apply(hidden, head_weight, plan)
    stats = {"count": count_span_tokens(span_sel)}
    stats.update({k: packed[i] for i, k in enumerate(plan.keys)})
    return loss, stats


def _fused_span_loss_static(hidden, head_weight, labels, span_id, spec, target, w_r, w_f, chunk_size,
                            span_token_counts, kd_gate=None, head_low=None):
    _check_static(hidden, head_weight, labels, span_id, spec, target)
    if kd_gate is not None and (spec.kind == "ce" or kd_gate.dim() != 0):
        raise ValueError("fused_span_loss: kd_gate must be a 0-d tensor and needs a KD loss kind (not 'ce')")
    span_id = span_id.long()
    sup = span_id > 0
    counts = count_span_tokens(span_id) if span_token_counts is None else span_token_counts
    coef = span_coefficients(span_id, w_r, w_f, counts)
    target = None if spec.kind == "ce" else _static_sparse_target(target, sup)
    chunk = chunk_size or auto_chunk_size(head_weight.shape[0], hidden.dtype, False, hidden.is_cuda)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    plan = _Plan(None, span_id, torch.where(sup, labels, 0), coef, target, spec, chunk, need_grad,
                 hidden.requires_grad, head_weight.requires_grad, stat_keys(spec, target), kd_gate, head_low)
    loss, packed = _FusedSpanLoss.apply(hidden, head_weight, plan)
    stats = {"count": count_span_tokens(span_id)}
    stats.update({k: packed[i] for i, k in enumerate(plan.keys)})
    return loss, stats

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
  pass `exp(z - R) * dF/dR` for the gradient, plus scatters of dF/d(gathered values). The small
  [C, K + 1] problem F is solved with autograd. R is computed exactly (masked), never as
  `log(1 - sum of known probs)`, which cancels catastrophically when the rest mass is small.
- Dense targets use explicit gradient formulas per divergence over full rows (smaller chunks).
- On CUDA the vocab-wide row functions are compiled with torch.compile (fused upcast + reduce /
  elementwise, bf16 in and out, fp32 math); anything failing to compile falls back to eager.
  Set VPMOE_KD_COMPILE=0 to disable. Math is fp32 (fp64 when the inputs are fp64).
- grad_weight accumulates in the head weight's dtype (bf16 weights accumulate in bf16, as Liger).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from vpmoe.kd.losses import (STAT_KEYS, TEACHER_LOGP_FLOOR, DenseTarget, LossSpec, SparseTarget,
                             check_inputs, count_span_tokens, span_coefficients, stats_from_rows)

CHUNK_BYTES = 256 * 2**20  # budget for one [C, V] logits chunk in the compute dtype
NEG_INF = float("-inf")


def auto_chunk_size(vocab: int, dtype: torch.dtype, dense: bool) -> int:
    """Largest power-of-two row count whose [C, V] logits fit CHUNK_BYTES (a quarter for dense)."""
    rows = CHUNK_BYTES // (vocab * dtype.itemsize) // (4 if dense else 1)
    return 1 << int(math.log2(max(16, rows)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- vocab-wide row functions

def _row_lse(z: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z.to(_acc(z.dtype)), dim=-1)


def _rest_grad(z: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * exp(z - lse) per row, in z's dtype (entries at -inf give exactly 0)."""
    return (torch.exp(z.to(lse.dtype) - lse[:, None]) * scale[:, None]).to(z.dtype)


def _dense_rows(zs, zt, labels, coef, kind: str, temp: float, beta: float, alpha: float,
                scale: float, center: float, cw_min: float, cw_max: float, need_grad: bool):
    """Per-token loss pieces and d(sum coef * loss)/d zs for full student/teacher rows."""
    acc = _acc(zs.dtype)
    zs, zt = zs.to(acc), zt.to(acc)
    ls1, lt1 = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ce = -ls1.gather(1, labels[:, None]).squeeze(1)
    t_lab = lt1.gather(1, labels[:, None]).squeeze(1)
    kl = (lt1.exp() * (lt1 - ls1)).sum(-1)
    q1 = ls1.exp()
    if kind == "cwce":
        weight = torch.exp((t_lab - center) / temp).clamp(cw_min, cw_max)
        kd, g_kd = weight * ce, weight[:, None] * q1  # the one-hot part is added with CE's below
        onehot_coef = weight * (1 - alpha) + alpha
    else:
        lq = ls1 if temp == 1.0 else torch.log_softmax(zs / temp, -1)
        lp = lt1 if temp == 1.0 else torch.log_softmax(zt / temp, -1)
        q, p = lq.exp(), lp.exp()
        if kind == "fkl":
            div, g_u = (p * (lp - lq)).sum(-1), q - p
        else:
            if kind == "rkl":
                h = lq - lp
                div = (q * h).sum(-1)
            elif kind == "jsd":
                lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
                div = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
                h = (1 - beta) * (lq - lm)
            else:  # tvd; sign(0) = 0 is the subgradient at ties
                div = 0.5 * (p - q).abs().sum(-1)
                h = 0.5 * torch.sign(q - p)
            g_u = q * (h - (q * h).sum(-1, keepdim=True))  # softmax Jacobian applied to dD/dq
        kd, g_kd = scale * div, (scale / temp) * g_u
        onehot_coef = torch.full_like(ce, alpha)
    loss = (1 - alpha) * kd + alpha * ce
    grad = None
    if need_grad:
        grad = ((1 - alpha) * g_kd + alpha * q1) * coef[:, None]
        grad.scatter_add_(1, labels[:, None], (-onehot_coef * coef)[:, None])
    return {"loss_sum": loss, "ce_sum": ce, "kd_sum": kd, "kl_sum": kl, "teacher_logp_sum": t_lab}, grad


_COMPILED: dict = {}


def _fast(fn, *args, **kwargs):
    """Run fn compiled on CUDA (once per function; eager fallback on any compile failure)."""
    if not args[0].is_cuda or os.environ.get("VPMOE_KD_COMPILE", "1") == "0":
        return fn(*args, **kwargs)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True)
    if compiled is not False:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any inductor failure: eager is always correct
            warnings.warn(f"vpmoe.kd.fused: torch.compile of {fn.__name__} failed ({e!r}); using eager")
            _COMPILED[fn] = False
    return fn(*args, **kwargs)


# ---------------------------------------------------------------- the small per-token problem

def _masked_log_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log-softmax over valid entries; invalid entries come out as 0 (callers mask them)."""
    x = x.masked_fill(~valid, NEG_INF)
    return torch.where(valid, x - torch.logsumexp(x, -1, keepdim=True), 0.0)


def _divergence_log(kind: str, a, b, valid, beta: float) -> torch.Tensor:
    """D(teacher a, student b) from log-probs over valid categories, in log space."""
    pa, pb = torch.where(valid, a.exp(), 0.0), torch.where(valid, b.exp(), 0.0)
    if kind == "fkl":
        return (pa * (a - b)).sum(-1)
    if kind == "rkl":
        return (pb * (b - a)).sum(-1)
    if kind == "jsd":
        m = torch.logaddexp(a + math.log(beta), b + math.log(1 - beta))
        return beta * (pa * (a - m)).sum(-1) + (1 - beta) * (pb * (b - m)).sum(-1)
    if kind == "tvd":
        return 0.5 * (pa - pb).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def _sparse_token_losses(g_lab, g_ids, rest, valid, tgt, spec: LossSpec, center):
    """Loss pieces from gathered student logits and the masked rest logsumexp (see docstring)."""
    if g_ids is None:  # plain CE: the rest is the whole row
        ce = rest - g_lab
        return {"loss_sum": ce, "ce_sum": ce}
    g_masked = g_ids.masked_fill(~valid, NEG_INF)
    lse_all = torch.logaddexp(rest, torch.logsumexp(g_masked, -1))
    ce = lse_all - g_lab
    t_lp = tgt.logprobs.to(g_ids.dtype).clamp_min(TEACHER_LOGP_FLOOR)
    t_rest = tgt.rest_logmass.to(g_ids.dtype).clamp_min(TEACHER_LOGP_FLOOR)
    if spec.sparse_mode == "tail":
        cat_valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
        s1 = torch.cat([g_ids - lse_all[:, None], (rest - lse_all)[:, None]], 1)
        s1 = torch.where(cat_valid, s1, 0.0)
        t1 = _masked_log_softmax(torch.cat([t_lp, t_rest[:, None]], 1), cat_valid)
    else:
        cat_valid = valid
        s1, t1 = _masked_log_softmax(g_ids, valid), _masked_log_softmax(t_lp, valid)
    out = {"ce_sum": ce, "kl_sum": _divergence_log("fkl", t1, s1, cat_valid, 0.5)}
    t_lab = None if tgt.label_logprob is None else tgt.label_logprob.to(g_ids.dtype)
    if t_lab is not None:
        out["teacher_logp_sum"] = t_lab
    temp = spec.temperature
    if spec.kind == "cwce":
        weight = torch.exp((t_lab - center) / temp).clamp(spec.cwce_min, spec.cwce_max)
        kd = weight * ce
    else:
        sT = s1 if temp == 1.0 else _masked_log_softmax(s1 / temp, cat_valid)
        tT = t1 if temp == 1.0 else _masked_log_softmax(t1 / temp, cat_valid)
        kd = spec.kd_scale * _divergence_log(spec.kind, tT, sT, cat_valid, spec.beta)
    out["kd_sum"] = kd
    out["loss_sum"] = (1 - spec.ce_weight) * kd + spec.ce_weight * ce
    return out


def _sparse_chunk(z, labels, tgt, coef, spec, center, need_grad):
    """z: this chunk's logits [C, V] (owned, overwritten). Returns (rows, grad_z or None)."""
    acc = _acc(z.dtype)
    lab = labels[:, None]
    g_lab = z.gather(1, lab).squeeze(1).to(acc)
    ids = valid = g_ids = None
    if tgt is not None:
        valid = tgt.ids >= 0
        ids = torch.where(valid, tgt.ids, tgt.ids[:, :1])  # padding repeats slot 0 (harmless)
        g_ids = z.gather(1, ids).to(acc)
        z.scatter_(1, ids, NEG_INF)
    rest = _fast(_row_lse, z)
    leaves = [t for t in (g_lab, g_ids, rest) if t is not None]
    with torch.enable_grad():
        for t in leaves:
            t.requires_grad_(True)
        rows = _sparse_token_losses(g_lab, g_ids, rest, valid, tgt, spec, center)
        if not need_grad:
            return {k: v.detach() for k, v in rows.items()}, None
        grads = torch.autograd.grad((coef * rows["loss_sum"]).sum(), leaves)
    d_lab, d_rest = grads[0], grads[-1]
    grad_z = _fast(_rest_grad, z, rest.detach(), d_rest)  # exp(-inf) = 0 at the known ids
    if ids is not None:
        grad_z.scatter_add_(1, ids, grads[1].to(z.dtype))
    grad_z.scatter_add_(1, lab, d_lab[:, None].to(z.dtype))
    return {k: v.detach() for k, v in rows.items()}, grad_z


def _dense_chunk(z, t_logits, labels, coef, spec, center, need_grad):
    return _fast(_dense_rows, z, t_logits, labels, coef, spec.kind, spec.temperature, spec.beta,
                 spec.ce_weight, spec.kd_scale, float(center), spec.cwce_min, spec.cwce_max, need_grad)


def _teacher_logits(target: DenseTarget, r0: int, r1: int, dtype) -> torch.Tensor:
    if target.logits is not None:
        return target.logits[r0:r1]
    return target.hidden[r0:r1] @ target.head_weight.to(target.hidden.dtype).T


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
        t = _teacher_logits(target, r0, r0 + chunk, None)
        t = t.to(_acc(t.dtype))
        lab = labels_sel[r0:r0 + chunk, None]
        total += float((t.gather(1, lab).squeeze(1) - torch.logsumexp(t, -1)).double().sum())
    return total / labels_sel.numel()


class _FusedSpanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, plan: "_Plan"):
        sel, labels, target, spec, chunk, need_grad = (plan.sel, plan.labels, plan.target, plan.spec,
                                                      plan.chunk, plan.need_grad)
        cdtype = hidden.dtype
        w = weight.to(cdtype)
        h_sel = hidden[sel]
        coef = plan.coef.to(_acc(cdtype))
        center = _cwce_center(spec, target, labels, chunk)
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad else None
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        sums = {k: [] for k in STAT_KEYS}
        for r0 in range(0, sel.numel(), chunk):
            r1 = min(r0 + chunk, sel.numel())
            h = h_sel[r0:r1]
            z = h @ w.T
            if isinstance(target, DenseTarget):
                tz = _teacher_logits(target, r0, r1, cdtype)
                rows, grad_z = _dense_chunk(z, tz, labels[r0:r1], coef[r0:r1], spec, center, need_grad)
            else:
                tgt = None if target is None else target.select(slice(r0, r1))
                rows, grad_z = _sparse_chunk(z, labels[r0:r1], tgt, coef[r0:r1], spec, center, need_grad)
            del z
            loss += (coef[r0:r1] * rows["loss_sum"]).sum().double()
            for k in STAT_KEYS:
                sums[k].append(rows.get(k))
            if grad_z is not None:
                grad_z = grad_z.to(cdtype)
                grad_hidden.index_copy_(0, sel[r0:r1], grad_z @ w)
                if grad_weight.dtype == cdtype:
                    grad_weight.addmm_(grad_z.T, h)
                else:
                    grad_weight += (grad_z.T @ h).to(grad_weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        stat_rows = {k: torch.cat(v) for k, v in sums.items() if v and v[0] is not None}
        stats = stats_from_rows(plan.span_sel, stat_rows)
        packed = torch.stack([stats[k] for k in STAT_KEYS])
        ctx.mark_non_differentiable(packed)
        return loss.to(_acc(cdtype)), packed

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_hidden, grad_weight = ctx.grads
        if grad_hidden is None:
            raise RuntimeError("fused_span_loss: backward after a forward without gradients")
        ctx.grads = None
        g = grad_loss.to(grad_hidden.dtype)
        gh = grad_hidden.mul_(g) if ctx.needs_input_grad[0] else None
        gw = grad_weight.mul_(g.to(grad_weight.dtype)) if ctx.needs_input_grad[1] else None
        return gh, gw, None


@dataclass
class _Plan:
    """Everything forward needs besides the two differentiable inputs (rows = supervised only)."""

    sel: torch.Tensor  # [M] supervised row indices into hidden
    span_sel: torch.Tensor  # [M] their span ids
    labels: torch.Tensor  # [M]
    coef: torch.Tensor  # [M] w_span / n_span
    target: SparseTarget | DenseTarget | None  # M rows
    spec: LossSpec
    chunk: int
    need_grad: bool


def fused_span_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                    span_id: torch.Tensor, spec: LossSpec, target=None, w_r: float = 1.0,
                    w_f: float = 1.0, chunk_size: int | None = None,
                    span_token_counts: torch.Tensor | None = None):
    """Span-normalised CE/KD loss from hidden [N, d] and head [V, d]; returns (loss, stats).

    `target`: SparseTarget / DenseTarget with N rows or M rows (supervised positions only, in
    order). `span_token_counts` ([3], index = span id): normalisers for the whole global batch
    (default: this call's counts). `stats`: per-span (index = span id) detached float64 sums of
    loss/ce/kd/kl/teacher_logp and int64 `count`; see `vpmoe.kd.losses.span_means`.
    """
    sel = check_inputs(hidden, head_weight, labels, span_id, spec, target)
    counts = count_span_tokens(span_id) if span_token_counts is None else span_token_counts
    span_sel = span_id[sel]
    coef = span_coefficients(span_sel, w_r, w_f, counts)
    if spec.kind == "ce":
        target = None
    elif target.rows != sel.numel():
        target = target.select(sel)
    dense = isinstance(target, DenseTarget)
    chunk = chunk_size or auto_chunk_size(head_weight.shape[0], hidden.dtype, dense)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    plan = _Plan(sel, span_sel, labels[sel], coef, target, spec, chunk, need_grad)
    loss, packed = _FusedSpanLoss.apply(hidden, head_weight, plan)
    stats = {"count": torch.bincount(span_sel, minlength=3)[:3].to(torch.int64)}
    stats.update({k: packed[i] for i, k in enumerate(STAT_KEYS)})
    return loss, stats

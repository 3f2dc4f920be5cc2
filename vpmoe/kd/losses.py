"""Loss spec, teacher targets, span bookkeeping, and the plain (materialised) reference losses.

Design choices:
- One `LossSpec` names every objective: `ce` (plain next-token CE) or a KD term (`fkl`, `rkl`,
  `jsd`, `tvd`, `cwce`) mixed with CE as `(1 - ce_weight) * kd + ce_weight * ce` per token.
- Divergences compare *tempered* distributions and are multiplied by T^2 (Hinton), so gradient
  scale does not shrink with T; CE is always at T = 1. `cwce` is the training plan's
  confidence-weighted CE: weight `clip(exp((logp_t - m) / T), cwce_min, cwce_max)` (detached)
  times CE, with `m = cwce_center` or, when unset, the mean teacher log-prob of this call's
  supervised tokens.
- A sparse teacher target (cached top-k) is a distribution over K known ids plus one "rest"
  bucket holding the teacher mass outside them (`sparse_mode = "tail"`, the default). The
  student is coarsened the same way: its log-probs at the K ids and its log mass outside them.
  Temperature is applied to these K + 1 coarse log-probs (divide by T, renormalise) for teacher
  and student alike, so the loss is zero iff the coarse distributions agree. `sparse_mode =
  "renorm"` drops the bucket and renormalises both over the K ids. Slots with id -1 are padding
  (slot 0 must be valid). Teacher log-probs are floored at -100 so every category is finite.
- A dense target is the teacher's logits (or its hidden states + head, recomputed per chunk in
  the fused path); the divergence is over the whole vocabulary.
- Span normalisation: `loss = w_r * sum_{span 1} l / n_1 + w_f * sum_{span 2} l / n_2`, where n_s
  are this call's counts or the caller's `span_token_counts` (global batch counts: then summing
  the returned losses over micro-batches and ranks gives the global span means exactly). An
  empty span contributes 0. Positions with span id 0 are ignored.
- The reference here materialises [N, V] logits in fp32 (or fp64) and uses autograd; it is the
  ground truth for `vpmoe.kd.fused`. It is written plainly, in probability space, on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vpmoe.config import ConfigError

KD_KINDS = ("fkl", "rkl", "jsd", "tvd", "cwce")
TEACHER_LOGP_FLOOR = -100.0  # e^-100: teacher categories stay finite (RKL never infinite)
STAT_KEYS = ("loss_sum", "ce_sum", "kd_sum", "kl_sum", "teacher_logp_sum")


@dataclass
class LossSpec:
    """Which objective, at what temperature, mixed how much with CE (see module docstring)."""

    kind: Literal["ce", "fkl", "rkl", "jsd", "tvd", "cwce"] = "ce"
    temperature: float = 1.0
    beta: float = 0.5  # jsd: mixture m = beta * teacher + (1 - beta) * student
    ce_weight: float = 0.0  # token loss = (1 - ce_weight) * kd + ce_weight * ce
    sparse_mode: Literal["tail", "renorm"] = "tail"
    t2_scale: bool = True  # multiply divergences by T^2
    cwce_center: float | None = None  # m in the cwce weight; None: mean over the call's tokens
    cwce_min: float = 0.25
    cwce_max: float = 4.0

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta: must be in (0, 1) (use fkl/rkl for the end points), got {self.beta}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(f"ce_weight: must be in [0, 1], got {self.ce_weight}")
        if not 0.0 < self.cwce_min <= self.cwce_max:
            raise ConfigError(f"cwce_min/cwce_max: need 0 < min <= max, got {self.cwce_min}, {self.cwce_max}")

    @property
    def kd_scale(self) -> float:
        return self.temperature ** 2 if self.t2_scale and self.kind != "cwce" else 1.0


@dataclass
class SparseTarget:
    """Teacher top-k (+ extra known ids) per row: rows are all N positions or the M supervised ones."""

    ids: torch.Tensor  # [R, K] int64, -1 = padding slot (slot 0 always valid)
    logprobs: torch.Tensor  # [R, K] teacher log-probs at T = 1 (ignored at padding)
    rest_logmass: torch.Tensor  # [R] log of the teacher mass outside the valid ids
    label_logprob: torch.Tensor | None = None  # [R] teacher log-prob of the actual next token

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def select(self, index: torch.Tensor) -> "SparseTarget":
        lab = None if self.label_logprob is None else self.label_logprob[index]
        return SparseTarget(self.ids[index], self.logprobs[index], self.rest_logmass[index], lab)


@dataclass
class DenseTarget:
    """Full teacher logits [R, V], or teacher hidden [R, d_t] + head [V, d_t] (fused path recomputes)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]

    def select(self, index: torch.Tensor) -> "DenseTarget":
        if self.logits is not None:
            return DenseTarget(logits=self.logits[index])
        return DenseTarget(hidden=self.hidden[index], head_weight=self.head_weight)

    def logits_rows(self) -> torch.Tensor:
        if self.logits is not None:
            return self.logits
        return self.hidden @ self.head_weight.to(self.hidden.dtype).T


# ---------------------------------------------------------------- span bookkeeping (shared)

def rest_without(rest: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """log(exp(rest) - exp(logp)) in float64, floored at TEACHER_LOGP_FLOOR: a target's rest bucket
    once an id of log-prob `logp` that it held is named (the label added to a cached target)."""
    r, p = rest.double(), logp.double()
    kept = -torch.expm1(torch.clamp(p - r, max=0.0))  # 1 - exp(logp - rest), in [0, 1]
    return (r + torch.log(kept.clamp_min(1e-30))).clamp_min(TEACHER_LOGP_FLOOR)


def count_span_tokens(span_id: torch.Tensor) -> torch.Tensor:
    """[3] int64 counts indexed by span id (index 0 = ignored positions, reported as 0). A
    scatter-add, not bincount: no host sync on CUDA (the CUDA-graph step counts with it too)."""
    span = span_id.reshape(-1).clamp(0, 2)
    return torch.zeros(3, dtype=torch.int64, device=span.device).scatter_add_(0, span, (span > 0).to(torch.int64))


def check_shapes(hidden, head_weight, labels, span_id) -> int:
    """Shape checks on Python ints only (no host sync); returns N."""
    n = hidden.shape[0]
    if hidden.dim() != 2 or head_weight.dim() != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and head_weight {tuple(head_weight.shape)}: "
                         "expected [N, d] and [V, d]")
    if labels.shape != (n,) or span_id.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} / span_id {tuple(span_id.shape)}: expected [{n}]")
    return n


def check_target(spec: LossSpec, target, vocab: int) -> None:
    """The target checks both loss forms share, on shapes only: a KD kind has a target; a sparse
    one has 1 <= K < vocab ids per row and, for cwce, the teacher's label log-prob."""
    if target is None:
        raise ValueError(f"loss kind {spec.kind!r} needs a teacher target (SparseTarget or DenseTarget)")
    if isinstance(target, SparseTarget):
        k = target.ids.shape[1]
        if not 1 <= k < vocab:
            raise ValueError(f"sparse target: K={k} ids per row, need 1 <= K < vocab={vocab}")
        if spec.kind == "cwce" and target.label_logprob is None:
            raise ValueError("loss kind 'cwce' needs target.label_logprob (teacher log-prob of the actual token)")


def check_inputs(hidden, head_weight, labels, span_id, spec: LossSpec, target) -> torch.Tensor:
    """Validate shapes/ids; return the index of supervised rows (span 1 or 2)."""
    n = check_shapes(hidden, head_weight, labels, span_id)
    if span_id.numel() and (span_id.min() < 0 or span_id.max() > 2):
        raise ValueError("span_id: values must be 0 (ignore), 1 (reasoning) or 2 (final)")
    sel = torch.nonzero(span_id > 0).squeeze(1)
    vocab = head_weight.shape[0]
    lab = labels[sel]
    if lab.numel() and (lab.min() < 0 or lab.max() >= vocab):
        bad = sel[((lab < 0) | (lab >= vocab)).nonzero()[0, 0]].item()
        raise ValueError(f"labels: position {bad} is supervised (span_id={span_id[bad].item()}) "
                         f"but its label {labels[bad].item()} is outside [0, {vocab})")
    if spec.kind == "ce":
        return sel
    check_target(spec, target, vocab)
    if target.rows not in (n, sel.numel()):
        raise ValueError(f"target has {target.rows} rows; expected N={n} (all positions) or "
                         f"M={sel.numel()} (supervised positions only)")
    if isinstance(target, SparseTarget):
        rows = target.ids if target.rows == sel.numel() else target.ids[sel]
        if rows.numel() and (rows[:, 0].min() < 0 or rows.max() >= vocab):
            raise ValueError(f"sparse target: ids must be in [0, {vocab}) with slot 0 valid (-1 pads later slots)")
    return sel


def span_coefficients(span_sel: torch.Tensor, w_r: float, w_f: float,
                      counts: torch.Tensor) -> torch.Tensor:
    """Per token weight w_span / n_span (float64); an empty span and span 0 get no weight."""
    counts = torch.as_tensor(counts, dtype=torch.float64, device=span_sel.device).reshape(-1)
    if counts.numel() != 3:
        raise ValueError(f"span_token_counts: expected 3 entries indexed by span id, got {counts.numel()}")
    weights = torch.zeros(3, dtype=torch.float64, device=span_sel.device)  # no host-to-device copy
    weights[1].fill_(w_r)
    weights[2].fill_(w_f)
    per_span = torch.where(counts > 0, weights / counts.clamp_min(1), torch.zeros_like(weights))
    return per_span.index_select(0, span_sel)


def stat_keys(spec: LossSpec, target) -> tuple[str, ...]:
    """The per-span sums a call reports: CE calls only loss/ce; KD calls add kd, kl and, when the
    teacher's label log-prob is known, teacher_logp."""
    if spec.kind == "ce":
        return ("loss_sum", "ce_sum")
    has_label = isinstance(target, DenseTarget) or target.label_logprob is not None
    return STAT_KEYS if has_label else STAT_KEYS[:-1]


def stats_from_rows(span_sel, rows: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """Per-span sums ([3], float64, index = span id) of per-token quantities, plus counts. Rows of
    span 0 (present when every row was computed, as in the static loss) add nothing; no host sync."""
    sup = span_sel > 0
    out = {"count": count_span_tokens(span_sel)}
    for key in keys:
        acc = torch.zeros(3, dtype=torch.float64, device=span_sel.device)
        if key in rows:
            acc.index_add_(0, span_sel, torch.where(sup, rows[key].detach().to(torch.float64), 0.0))
        out[key] = acc
    return out


def span_means(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """{'loss/reasoning': ..., 'kl/final': ...} means for logging (after any all-reduce)."""
    names = {1: "reasoning", 2: "final"}
    out = {}
    for key in STAT_KEYS:
        if key not in stats:
            continue
        for s, name in names.items():
            n = int(stats["count"][s])
            if n:
                out[f"{key.removesuffix('_sum')}/{name}"] = float(stats[key][s]) / n
    return out


# ---------------------------------------------------------------- reference math (materialised)

def _log_softmax_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over valid entries; invalid entries get probability exactly 0 (value -inf)."""
    x = x.masked_fill(~valid, float("-inf"))
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def divergence_reference(kind: str, t_logp, s_logp, beta: float) -> torch.Tensor:
    """D(teacher, student) per row from log-probs (-inf = impossible category), in probability space."""
    p, q = t_logp.exp(), s_logp.exp()
    has_p, has_q = p > 0, q > 0
    # zero-probability categories contribute 0; substituting finite logs keeps autograd NaN-free
    lp, lq = torch.where(has_p, t_logp, 0.0), torch.where(has_q, s_logp, 0.0)
    zero = torch.zeros_like(p)
    if kind == "fkl":
        return torch.where(has_p, p * (lp - lq), zero).sum(-1)
    if kind == "rkl":
        return torch.where(has_q, q * (lq - lp), zero).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = torch.where(m > 0, m, torch.ones_like(m)).log()
        kl_pm = torch.where(has_p, p * (lp - log_m), zero).sum(-1)
        kl_qm = torch.where(has_q, q * (lq - log_m), zero).sum(-1)
        return beta * kl_pm + (1 - beta) * kl_qm
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def coarse_sparse(logits: torch.Tensor, target: SparseTarget, mode: str):
    """Teacher and student log-probs over the K known ids (+ the rest bucket in 'tail' mode)."""
    valid = target.ids >= 0
    ids = torch.where(valid, target.ids, target.ids[:, :1])
    s_full = torch.log_softmax(logits, dim=-1)
    s_ids = s_full.gather(1, ids)
    t_ids = target.logprobs.to(logits.dtype).clamp_min(TEACHER_LOGP_FLOOR)
    if mode == "renorm":
        return _log_softmax_masked(t_ids, valid), _log_softmax_masked(s_ids, valid), valid
    known = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    s_rest = torch.logsumexp(s_full.masked_fill(known, float("-inf")), dim=-1)
    t_rest = target.rest_logmass.to(logits.dtype).clamp_min(TEACHER_LOGP_FLOOR)
    t = torch.cat([t_ids, t_rest[:, None]], 1)
    s = torch.cat([s_ids.masked_fill(~valid, float("-inf")), s_rest[:, None]], 1)
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    # the cached teacher (quantised) need not sum to exactly 1: renormalise its K + 1 categories
    return _log_softmax_masked(t, valid), s, valid


def token_losses_reference(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                           target=None) -> dict[str, torch.Tensor]:
    """Per-token loss pieces for rows of materialised logits [M, V] (rows = supervised tokens)."""
    ce = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    out = {"ce_sum": ce}
    if spec.kind == "ce":
        out["loss_sum"] = ce
        return out
    temp = spec.temperature
    if isinstance(target, SparseTarget):
        t1, s1, valid = coarse_sparse(logits, target, spec.sparse_mode)
        t_lab = target.label_logprob.to(logits.dtype) if target.label_logprob is not None else None
        tempered = lambda x: _log_softmax_masked(x / temp, valid)  # noqa: E731
        tT, sT = tempered(t1), tempered(s1)
    else:
        t_logits = target.logits_rows().to(logits.dtype)
        t1, s1 = torch.log_softmax(t_logits, -1), torch.log_softmax(logits, -1)
        tT, sT = torch.log_softmax(t_logits / temp, -1), torch.log_softmax(logits / temp, -1)
        t_lab = t1.gather(1, labels[:, None]).squeeze(1)
    if spec.kind == "cwce":
        center = spec.cwce_center if spec.cwce_center is not None else t_lab.mean()
        weight = torch.exp((t_lab - center) / temp).clamp(spec.cwce_min, spec.cwce_max).detach()
        kd = weight * ce
    else:
        kd = spec.kd_scale * divergence_reference(spec.kind, tT, sT, spec.beta)
    out["kd_sum"] = kd
    out["loss_sum"] = (1 - spec.ce_weight) * kd + spec.ce_weight * ce
    out["kl_sum"] = divergence_reference("fkl", t1, s1, 0.5)
    if t_lab is not None:
        out["teacher_logp_sum"] = t_lab
    return out


def span_loss_reference(hidden, head_weight, labels, span_id, spec: LossSpec, target=None,
                        w_r: float = 1.0, w_f: float = 1.0, span_token_counts=None):
    """Materialised reference of `fused_span_loss` (same contract); autograd does the gradients."""
    sel = check_inputs(hidden, head_weight, labels, span_id, spec, target)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    counts = count_span_tokens(span_id) if span_token_counts is None else span_token_counts
    coef = span_coefficients(span_id[sel], w_r, w_f, counts).to(dtype)
    logits = (hidden[sel] @ head_weight.T).to(dtype)
    if target is not None and target.rows != sel.numel():
        target = target.select(sel)
    rows = token_losses_reference(logits, labels[sel], spec, target)
    loss = (coef * rows["loss_sum"]).sum()
    return loss, stats_from_rows(span_id[sel], rows, stat_keys(spec, target))

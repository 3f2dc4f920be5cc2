"""The trainer-facing KD objective: `KDConfig` and `KDObjective(hidden, head_weight, batch)`.

Design choices:
- `mode = "none"`: plain span-normalised CE. `"offline"`: sparse targets read from a teacher
  cache (checked against the training data's tokenizer sha and split hash at start-up, and each
  row against its token crc32 at lookup). `"online"`: an in-process HF teacher runs on the batch
  and gives a dense target as teacher hidden states + head (the fused loss recomputes teacher
  logits chunk by chunk, never holding [tokens, vocab]).
- Stage-2 mixing: a step is a KD step with probability `kd_fraction`, decided by a hash of
  (seed, step) so every rank and micro-batch of a step agree without communication, and a
  resumed run makes the same choices. CE steps use plain CE (`LossSpec(kind="ce")`).
- The objective takes the student's final hidden states and head weight, never logits; it returns
  `(loss, stats)` from `vpmoe.kd.fused.fused_span_loss`, plus `stats["kd"]` (1 on KD steps).
  Logging: `vpmoe.kd.losses.span_means(stats)` after summing stats over micro-batches and ranks
  gives loss/ce/kd/kl (forward KL teacher||student at T = 1, on the coarse distribution for
  sparse targets) and teacher_logp per span.
- Positions supervised = loss_mask = 1 and span_id > 0; cache rows are per loss_mask = 1 position.
- Staged targets: offline KD reads and decodes the cache rows of a micro-batch ahead of its step
  (`staged_target`, called by the trainer's prefetch thread) as fixed-shape tensors over all B*T
  positions plus a 0-d gate (1 on KD steps, 0 on CE steps, which stage a dummy target and skip
  the cache). The eager step selects the supervised rows; a captured step (CUDA graphs,
  `static=True`) uses all of them, with the gate making one captured loss the KD loss or plain CE
  (`fused_span_loss(kd_gate=...)`). Without staged fields the cache is read in the call.
- Vocabulary subsets (vpmoe.data.vocab_subset): the batch keeps full o200k ids (the cache checks
  and looks rows up by them); labels and the cached target ids are mapped to the student's compact
  ids here, and teacher mass on ids outside the subset joins the target's rest mass.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from vpmoe.config import ConfigError
from vpmoe.kd.fused import fused_span_loss
from vpmoe.kd.losses import DenseTarget, LossSpec, SparseTarget, rest_without


@dataclass
class KDConfig:
    mode: Literal["none", "offline", "online"] = "none"
    cache: str = ""  # offline: teacher cache directory (vpmoe teacher score --out)
    teacher: str = ""  # online: teacher TOML ([teacher] table, backend = "hf")
    loss: LossSpec = field(default_factory=lambda: LossSpec(kind="fkl"))
    kd_fraction: float = 0.7  # share of steps that use the KD loss (stage 2 plan: 0.5-0.8)
    include_label: bool = False  # offline: add the actual token to the known ids when outside them
    check_tokens: bool = True  # offline: compare each batch row's crc32 with the cached row's
    seed: int = 0  # of the KD/CE step choice
    chunk_size: int = 0  # fused loss rows per chunk; 0 = automatic

    def validate(self) -> None:
        if self.mode == "offline" and not self.cache:
            raise ConfigError("cache: mode 'offline' needs a teacher cache directory")
        if self.mode == "online" and not self.teacher:
            raise ConfigError("teacher: mode 'online' needs a teacher config TOML")
        if self.mode != "none" and self.loss.kind == "ce":
            raise ConfigError("loss.kind: a KD mode needs a KD loss (fkl, rkl, jsd, tvd, cwce)")
        if not 0.0 <= self.kd_fraction <= 1.0:
            raise ConfigError(f"kd_fraction: must be in [0, 1], got {self.kd_fraction}")
        if self.chunk_size < 0:
            raise ConfigError(f"chunk_size: must be >= 0, got {self.chunk_size}")


def is_kd_step(cfg: KDConfig, step: int) -> bool:
    """Deterministic per (seed, step) Bernoulli(kd_fraction)."""
    if cfg.mode == "none":
        return False
    digest = hashlib.sha256(f"{cfg.seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < cfg.kd_fraction


class KDObjective:
    """Built once per run; called per micro-batch."""

    def __init__(self, cfg: KDConfig, data_dir=None, split: str = "train", device=None, subset=None):
        self.cfg, self.device, self.subset = cfg, device, subset
        self.cache = self.teacher = None
        if cfg.mode == "offline":
            from vpmoe.kd.cache import TeacherCache
            from vpmoe.kd.score import data_manifest, data_split_hash, tokenizer_sha

            tok = data = None
            if data_dir is not None:  # refuse a cache scored on other data or another tokenizer
                manifest = data_manifest(data_dir)
                tok, data = tokenizer_sha(manifest), data_split_hash(manifest, split)
            self.cache = TeacherCache(cfg.cache, tokenizer_sha=tok, data_hash=data)
        elif cfg.mode == "online":
            from vpmoe.kd.teacher import HFTeacher, load_teacher_config

            tcfg = load_teacher_config(cfg.teacher)
            if tcfg.backend != "hf":
                raise ConfigError(f"{cfg.teacher}: online KD needs backend = 'hf'")
            self.teacher = HFTeacher(tcfg, top_k=1)
            if self.teacher.softcap:
                raise ConfigError(f"{cfg.teacher}: online KD does not support logit soft-capping teachers")
            t_sha = None if self.teacher.subset is None else self.teacher.subset.sha256
            s_sha = None if subset is None else subset.sha256
            if t_sha != s_sha:  # dense targets compare logits row by row: one vocabulary for both
                raise ConfigError(f"{cfg.teacher}: teacher vocab subset {t_sha} != student vocab subset {s_sha} (online KD "
                                  "compares whole distributions: give both one vocabulary, e.g. the full one for the "
                                  "student with --set data.vocab_subset='\"\"')")

    def __call__(self, hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict, step: int,
                 w_r: float = 1.0, w_f: float = 1.0, span_token_counts: torch.Tensor | None = None,
                 kd: bool | None = None, static: bool = False, head_low: torch.Tensor | None = None):
        """(loss, stats) for one micro-batch. hidden [B, T, d] (final-normed), head_weight [V, d]
        (`head_low`: its kept copy in hidden's dtype, see fused_span_loss);
        batch: tokens, labels, loss_mask, span_id, doc_ids, sample_index (docs/interfaces.md).
        `span_token_counts` ([3], index = span id): global-batch normalisers for exact gradient
        accumulation (see fused_span_loss). `kd` overrides the per-step KD/CE choice. `static`:
        the sync-free loss for a captured CUDA-graph step: CE, or with `staged_target` staged in
        the batch, the gated KD/CE loss of an offline KD run (`kd` and `step` are then ignored)."""
        kd = is_kd_step(self.cfg, step) if kd is None else kd
        b, t, d = hidden.shape
        mask = batch["loss_mask"].bool()
        span = torch.where(mask, batch["span_id"], torch.zeros_like(batch["span_id"]))
        labels = batch["labels"].reshape(-1)
        if self.subset is not None:
            labels = self.subset.to_compact(torch.where(mask.reshape(-1), labels, torch.full_like(labels, -100)))
        if static and "kd_gate" in batch:
            if self.subset is not None:
                raise ValueError("KDObjective(static=True): staged KD targets need the full vocabulary")
            target = SparseTarget(batch["kd_ids"], batch["kd_logprobs"], batch["kd_rest"], batch["kd_label_logprob"])
            loss, stats = fused_span_loss(hidden.reshape(b * t, d), head_weight, labels, span.reshape(-1),
                                          self.cfg.loss, target, w_r, w_f, chunk_size=self.cfg.chunk_size or None,
                                          span_token_counts=span_token_counts, static=True,
                                          kd_gate=batch["kd_gate"], head_low=head_low)
            stats["kd"] = batch["kd_gate"]
            return loss, stats
        target, spec = None, LossSpec(kind="ce")
        if kd and static:
            raise ValueError("KDObjective(static=True): KD steps read host-side teacher targets; CE steps only")
        if kd:
            spec = self.cfg.loss
            target = self._target(batch, mask, span)
        loss, stats = fused_span_loss(hidden.reshape(b * t, d), head_weight, labels, span.reshape(-1), spec,
                                      target, w_r, w_f, chunk_size=self.cfg.chunk_size or None,
                                      span_token_counts=span_token_counts, static=static, head_low=head_low)
        stats["kd"] = torch.tensor(int(kd))
        return loss, stats

    def staged_target(self, batch: dict, kd: bool) -> dict[str, torch.Tensor]:
        """One micro-batch's teacher target, staged ahead of its step: ids (full o200k) / log-probs
        [B*T, K], rest and label log-prob [B*T], gate [] (1 = KD step). KD steps read the cache
        (token checks included) and place its rows at the loss_mask positions; other rows, and every
        row of a CE step, hold a dummy target (ids 0..K-1, log-probs 0) that the loss weighs 0."""
        if self.cache is None:
            raise ValueError("KDObjective.staged_target: needs an offline teacher cache")
        mask = batch["loss_mask"].bool().reshape(-1)
        n, dev = mask.numel(), batch["labels"].device
        k = self.cache.spec.known + int(self.cfg.include_label)
        ids = torch.arange(k, device=dev).repeat(n, 1)
        lps, rest, lab = torch.zeros(n, k, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        if kd:
            t = self.cache.batch_target(batch["sample_index"], batch["loss_mask"],
                                        tokens=batch["tokens"] if self.cfg.check_tokens else None, device=dev,
                                        include_label=self.cfg.include_label,
                                        label_ids=batch["labels"] if self.cfg.include_label else None)
            ids[mask], lps[mask], rest[mask], lab[mask] = t.ids, t.logprobs.float(), t.rest_logmass.float(), \
                t.label_logprob.float()
        return {"kd_ids": ids, "kd_logprobs": lps, "kd_rest": rest, "kd_label_logprob": lab,
                "kd_gate": torch.tensor(float(kd), device=dev)}

    def _target(self, batch, mask, span):
        if "kd_ids" in batch:  # staged ahead (`staged_target`): its supervised rows, in order
            keep = torch.nonzero((span > 0).reshape(-1)).squeeze(1)
            target = SparseTarget(batch["kd_ids"][keep], batch["kd_logprobs"][keep], batch["kd_rest"][keep],
                                  batch["kd_label_logprob"][keep])
            return target if self.subset is None else \
                compact_sparse_target(target, self.subset, batch["labels"].reshape(-1)[keep])
        if self.cache is not None:
            labels = batch["labels"] if self.cfg.include_label else None
            target = self.cache.batch_target(batch["sample_index"], mask,
                                             tokens=batch["tokens"] if self.cfg.check_tokens else None,
                                             device=batch["labels"].device,
                                             include_label=self.cfg.include_label, label_ids=labels)
            keep = torch.nonzero(span[mask] > 0).squeeze(1).to(target.ids.device)
            target = target.select(keep)
            return target if self.subset is None else \
                compact_sparse_target(target, self.subset, batch["labels"][mask].to(keep.device)[keep])
        return self._online_target(batch, span)

    @torch.no_grad()
    def _online_target(self, batch, span) -> DenseTarget:
        """Teacher hidden states at the supervised positions, one document at a time."""
        tokens, doc_ids = batch["tokens"].cpu().numpy(), batch["doc_ids"].cpu().numpy()
        sup = (span > 0).cpu().numpy()
        docs = []
        for r in range(tokens.shape[0]):
            for doc in np.unique(doc_ids[r][doc_ids[r] >= 0]):
                where = np.flatnonzero(doc_ids[r] == doc)
                positions = np.flatnonzero(sup[r][where])
                if positions.size:
                    docs.append((tokens[r][where], positions))
        if not docs:
            return DenseTarget(hidden=torch.zeros(0, self.teacher.head.weight.shape[1], device=batch["tokens"].device),
                               head_weight=self.teacher.head.weight)
        hidden = self.teacher.hidden_at_docs(docs)
        return DenseTarget(hidden=hidden.to(batch["tokens"].device), head_weight=self.teacher.head.weight)


def compact_sparse_target(target: SparseTarget, subset, labels: torch.Tensor | None = None) -> SparseTarget:
    """Map a cached target's full-vocabulary ids to the subset's compact ids; known ids outside the
    subset become padding slots and their teacher mass joins the rest mass. A position none of whose
    known ids is in the subset gets its label (`labels`, full ids, one per row; always in a subset
    built from the data) as its one known id, the label's teacher log-prob taken off the rest mass
    (as `kd.include_label` does for every position)."""
    ids = subset.to_compact(target.ids, missing=-1)
    dropped = (ids < 0) & (target.ids >= 0)
    if dropped.any():
        lost = torch.logsumexp(target.logprobs.float().masked_fill(~dropped, float("-inf")), dim=1)
        rest = torch.logaddexp(target.rest_logmass.float(), lost).to(target.rest_logmass.dtype)
        slot0_lost = dropped[:, 0]
        if slot0_lost.any():  # slot 0 must stay valid: move the first surviving id there
            order = torch.argsort((ids < 0).to(torch.int8), dim=1, stable=True)
            ids, lps = ids.gather(1, order), target.logprobs.gather(1, order)
            empty = ids[:, 0] < 0
            if empty.any():
                ids, lps, rest = _label_for_empty(ids, lps, rest, empty, target.label_logprob, labels, subset)
        else:
            lps = target.logprobs
        return SparseTarget(ids, lps, rest, target.label_logprob)
    return SparseTarget(ids, target.logprobs, target.rest_logmass, target.label_logprob)


def _label_for_empty(ids, lps, rest, empty, label_lp, labels, subset):
    """`compact_sparse_target`'s rows with no known id left: the label becomes slot 0."""
    compact = None if labels is None or label_lp is None else subset.to_compact(labels.to(ids.device), missing=-1)
    if compact is None or (compact[empty] < 0).any():
        raise ValueError("a cached position has no known id inside the vocab subset, and its label is unknown "
                         "or outside it too: set kd.include_label = true, or data.vocab_subset = \"\" (full vocabulary)")
    ids, lps, rest = ids.clone(), lps.clone(), rest.clone()
    lab = label_lp.to(ids.device).double()
    ids[empty, 0] = compact[empty]
    lps[empty, 0] = lab[empty].to(lps.dtype)
    # the label's mass was in the rest bucket (outside every surviving id)
    rest[empty] = rest_without(rest[empty], lab[empty]).to(rest.dtype)
    return ids, lps, rest

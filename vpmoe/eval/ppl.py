"""Held-out data and held-out loss: the valid split of a `vpmoe data build` output, and the
loss / perplexity per span (reasoning, final) on it.

Design choices:
- The manifest (`manifest.json`) is the identity of the data: its tokenizer sha256 must equal the
  model's tokenizer hash, else the eval refuses before any forward, showing both (a different
  tokenizer makes every NLL meaningless). Its sha256 and config hash go into the report.
- Batches come from the data pipeline's own ordered eval pass (`vpmoe.data.loader.iter_eval_batches`,
  one row per batch, manifest order, no shuffling), so eval sees exactly the tokens, labels, masks,
  span ids and doc ids training sees. Prompts (format suite) and documents (router suite) come from
  the same split's shard rows; a prompt is a conversation cut where supervision starts (the first
  assistant `<|start|>`) plus `<|start|>assistant`, exactly what the Harmony renderer produces for
  completion.
- Loss is span-normalised as in training: mean NLL over supervised span-1 (reasoning) positions and
  over span-2 (final) positions, plus the pooled mean; perplexity = exp(mean NLL).
- Packed rows: vpMoE (or any model whose forward takes `doc_ids`) gets the packed row with
  `doc_ids`, so documents never attend to each other; any other HF model runs each document of the
  row on its own, which is the same computation (documents with nothing supervised, i.e. the
  loader's padding, are skipped). A supervised position whose label lies in the next document
  cannot happen in well-formed shards; such positions are excluded and counted.
- Log-softmax is taken in position chunks from the model's logits (or, for vpMoE, from final hidden
  states through the head), so the [positions, 201088] fp32 tensor never exists whole.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vpmoe.cli import UserError
from vpmoe.eval.harness import call_logits, forward_kwargs, model_device
from vpmoe.eval.loading import inner_vpmoe


class HeldOut:
    """The valid split of one built dataset (manifest + shards)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            raise UserError(f"{self.directory}: no manifest.json; --data must be a finished `vpmoe data build` output")
        raw = path.read_bytes()
        try:
            self.manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        tokenizer = self.manifest.get("tokenizer") if isinstance(self.manifest, dict) else None
        if not isinstance(tokenizer, dict) or not tokenizer.get("sha256"):
            raise UserError(f"{path}: no tokenizer.sha256 recorded; cannot check the data matches the model's tokenizer")
        self.tokenizer_sha256 = tokenizer["sha256"]
        self.tokenizer_name = tokenizer.get("name", "?")
        entries = (self.manifest.get("shards") or {}).get("valid") or []
        if not entries:
            raise UserError(f"{path}: the valid split is empty (build with valid_fraction > 0)")
        self.shard_names = [e["name"] for e in entries]
        self.seq_len = self.manifest.get("seq_len")
        self._split = None

    def split(self):
        """The data pipeline's reader of the valid split (checks sizes against the manifest)."""
        from vpmoe.data import DataError
        from vpmoe.data.loader import SplitData

        if self._split is None:
            try:
                self._split = SplitData(self.directory, "valid")
            except DataError as e:
                raise UserError(str(e)) from None
        return self._split

    def describe(self) -> dict:
        valid = ((self.manifest.get("counts") or {}).get("splits") or {}).get("valid", {})
        return {"path": str(self.directory), "manifest_sha256": self.manifest_sha256,
                "config_hash": self.manifest.get("config_hash"), "tokenizer_sha256": self.tokenizer_sha256,
                "tokenizer_name": self.tokenizer_name, "split": "valid", "shards": self.shard_names,
                "valid_rows": valid.get("rows"), "valid_docs": valid.get("docs"), "valid_tokens": valid.get("tokens")}

    def check_tokenizer(self, tokenizer) -> None:
        if tokenizer.sha256 != self.tokenizer_sha256:
            raise UserError(
                f"{self.directory / 'manifest.json'}: data tokenizer {self.tokenizer_name} sha256 "
                f"{self.tokenizer_sha256} differs from the model's tokenizer {tokenizer.name} sha256 "
                f"{tokenizer.sha256}; rebuild the data with the model's tokenizer (or evaluate a model on it)")

    def rows(self):
        """(arrays, document lengths) of every valid row, unpadded, in manifest order."""
        for shard in self.split().shards:
            for r in range(len(shard)):
                yield shard.row(r)

    def batches(self):
        """The loader's ordered eval pass over the valid split, one row per batch
        (tokens, labels, loss_mask, span_id, doc_ids, sample_index; padding is its own document)."""
        from vpmoe.data import DataError
        from vpmoe.data.loader import iter_eval_batches

        self.split()  # refuse a corrupt split before the first forward
        try:
            yield from iter_eval_batches(self.directory, batch_size=1, split="valid")
        except DataError as e:
            raise UserError(str(e)) from None

    def documents(self, max_docs: int | None = None) -> list[list[int]]:
        """Whole conversations (token ids), in order."""
        out = []
        for arrays, lengths in self.rows():
            start = 0
            for n in lengths:
                out.append([int(t) for t in arrays["tokens"][start:start + int(n)]])
                start += int(n)
                if max_docs is not None and len(out) >= max_docs:
                    return out
        return out

    def prompts(self, n: int) -> list[list[int]]:
        """Up to n prompts: each conversation up to its first assistant `<|start|>assistant`."""
        from vpmoe import tokenizer as tk

        opener = [tk.START_ID] + tk.encode("assistant")
        out = []
        for arrays, lengths in self.rows():
            start = 0
            for length in lengths:
                tokens = np.asarray(arrays["tokens"][start:start + int(length)])
                mask = np.asarray(arrays["loss_mask"][start:start + int(length)])
                start += int(length)
                supervised = np.flatnonzero(mask)
                if len(supervised) == 0:
                    continue
                t = int(supervised[0])  # predicting tokens[t + 1], the first assistant <|start|>
                if [int(x) for x in tokens[t + 1:t + 1 + len(opener)]] != opener:
                    continue
                out.append([int(x) for x in tokens[:t + 1]] + opener)
                if len(out) >= n:
                    return out
        return out


def open_heldout(directory: str | Path) -> HeldOut:
    return HeldOut(directory)


# ----------------------------------------------------------------------------------------------
# span NLL

SPANS = {1: "reasoning", 2: "final"}
CHUNK = 1024  # positions per log-softmax chunk


def chunked_nll(logits_fn, labels: torch.Tensor, n: int) -> torch.Tensor:
    """NLL [n] of `labels` under logits produced chunk by chunk by `logits_fn(lo, hi)` -> [hi-lo, V]."""
    out = []
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        logp = F.log_softmax(logits_fn(lo, hi).float(), dim=-1)
        out.append(-logp.gather(-1, labels[lo:hi, None]).squeeze(-1))
    return torch.cat(out) if out else labels.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def row_nll(model, tokens: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor,
            loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position NLL [T] of one packed row (labels clamped where unused; mask applied by caller).
    Per-document mode skips documents with nothing supervised (the loader's padding)."""
    device = model_device(model)
    safe_labels = labels.clamp(min=0).to(device)
    inner = inner_vpmoe(model)
    if inner is not None:  # packed forward with doc_ids, hidden -> head in chunks
        hidden = inner(tokens[None].to(device), doc_ids=doc_ids[None].to(device), return_hidden=True).hidden[0]
        return chunked_nll(lambda lo, hi: inner.lm_head(hidden[lo:hi]), safe_labels, len(tokens)).cpu()
    if "doc_ids" in forward_kwargs(model):
        logits = call_logits(model, tokens[None].to(device), doc_ids=doc_ids[None].to(device))[0]
        return chunked_nll(lambda lo, hi: logits[lo:hi], safe_labels, len(tokens)).cpu()
    nll = torch.zeros(len(tokens))
    bounds = segment_bounds(doc_ids)
    for lo, hi in bounds:  # one document at a time: positions restart, nothing leaks across
        if loss_mask is not None and not bool(loss_mask[lo:hi].any()):
            continue
        logits = call_logits(model, tokens[lo:hi][None].to(device))[0]
        nll[lo:hi] = chunked_nll(lambda a, b: logits[a:b], safe_labels[lo:hi], hi - lo).cpu()
    return nll


def segment_bounds(doc_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[lo, hi) of each run of equal doc ids."""
    if len(doc_ids) == 0:
        return []
    change = (doc_ids[1:] != doc_ids[:-1]).nonzero().flatten().tolist()
    starts = [0] + [c + 1 for c in change]
    ends = [c + 1 for c in change] + [len(doc_ids)]
    return list(zip(starts, ends))


def cross_document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool [T]: position t predicts a token of another document (t is a document's last token)."""
    out = torch.zeros_like(doc_ids, dtype=torch.bool)
    out[:-1] = doc_ids[1:] != doc_ids[:-1]
    out[-1] = True  # the row's last label is never inside the row
    return out


class SpanAccumulator:
    def __init__(self):
        self.sums = {s: 0.0 for s in SPANS}
        self.counts = {s: 0 for s in SPANS}
        self.cross_doc_dropped = 0
        self.rows = 0

    def add(self, nll: torch.Tensor, loss_mask: torch.Tensor, span_id: torch.Tensor, doc_ids: torch.Tensor,
            labels: torch.Tensor) -> None:
        mask = loss_mask.bool() & (labels >= 0)
        crossing = mask & cross_document_positions(doc_ids)
        self.cross_doc_dropped += int(crossing.sum())
        mask = mask & ~crossing
        for s in SPANS:
            sel = mask & (span_id == s)
            self.sums[s] += float(nll[sel].double().sum())
            self.counts[s] += int(sel.sum())
        self.rows += 1

    def result(self) -> dict:
        spans = {}
        for s, name in SPANS.items():
            n = self.counts[s]
            mean = self.sums[s] / n if n else None
            spans[name] = {"tokens": n, "nll": mean, "ppl": math.exp(mean) if mean is not None else None}
        n_all = sum(self.counts.values())
        mean_all = sum(self.sums.values()) / n_all if n_all else None
        spans["all"] = {"tokens": n_all, "nll": mean_all, "ppl": math.exp(mean_all) if mean_all is not None else None}
        return {"spans": spans, "rows": self.rows, "cross_document_positions_dropped": self.cross_doc_dropped}


def evaluate_batches(model, batches, max_rows: int | None = None, progress=None) -> dict:
    """Span NLL over an iterable of loader batches (dicts of [B, T] tensors)."""
    acc = SpanAccumulator()
    for batch in batches:
        for key in ("tokens", "labels", "loss_mask", "span_id", "doc_ids"):
            if key not in batch:
                raise KeyError(f"data batch has no '{key}' (docs/interfaces.md, Batches)")
        for b in range(batch["tokens"].shape[0]):
            if max_rows is not None and acc.rows >= max_rows:
                return acc.result()
            tokens, labels = batch["tokens"][b].long(), batch["labels"][b].long()
            doc_ids = batch["doc_ids"][b].long()
            nll = row_nll(model, tokens, labels, doc_ids, batch["loss_mask"][b])
            acc.add(nll, batch["loss_mask"][b], batch["span_id"][b].long(), doc_ids, labels)
            if progress and acc.rows % 64 == 0:
                progress(f"ppl: {acc.rows} rows")
    return acc.result()

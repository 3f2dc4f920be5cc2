"""Teacher backends behind one interface: `hf` (a local AutoModelForCausalLM) and `vllm` (an
OpenAI-compatible vLLM server asked for prompt log-probs).

Design choices:
- One call: `teacher.score_docs(docs)` with `docs = [(tokens, positions)]`, one entry per
  *document* (a conversation of a packed row, never crossing into the next one, exactly what the
  student attends to); `positions` are the supervised indices t inside the document, whose
  target is `tokens[t + 1]`. It returns per document `DocScores` (known ids + log-probs, label
  log-prob, rest log-mass), already reduced to what the cache stores.
- `hf`: documents are sorted by length and batched up to `max_batch_tokens` padded tokens; the
  base model gives final hidden states and the head is applied only at supervised positions, in
  chunks, so [tokens, vocab] logits are never held. Top-k, the label log-prob, tail samples and
  the exact rest mass (logsumexp outside the known ids) are computed on the device.
- `vllm`: one POST /v1/completions per `docs_per_request` documents, with token-id prompts,
  `max_tokens = 1` and `prompt_logprobs = top_k` (start the server with `--max-logprobs >= top_k`;
  the default `--logprobs-mode raw_logprobs` gives the model's own distribution). Requests run
  on `concurrency` threads, each with a timeout and retries with exponential backoff (timeouts,
  connection errors, HTTP 429/5xx); other HTTP errors and a failed last retry raise TeacherError
  with the server's message. The rest mass is `1 - sum(top-k probs)` (vLLM gives nothing more);
  tail samples are not available.
- Config: `[teacher]` table of a TOML file validated into `TeacherConfig` (configs/teacher_*.toml).
"""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vpmoe.kd import KDError
from vpmoe.config import ConfigError, load_section
from vpmoe.kd.losses import TEACHER_LOGP_FLOOR

RETRY_HTTP = {408, 429, 500, 502, 503, 504}


class TeacherError(KDError):
    """The teacher backend failed (after retries) or answered something unusable."""


@dataclass
class TeacherConfig:
    backend: Literal["hf", "vllm"] = "hf"
    name: str = ""  # teacher id recorded in cache manifests (default: path or model)
    temperature: float = 1.0  # the cache stores softmax(logits / temperature)
    # hf
    path: str = ""  # a directory with config.json + weights (AutoModelForCausalLM)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"  # auto: cuda when available, else cpu
    attn_implementation: str = ""  # e.g. "sdpa", "eager"; empty: transformers' default
    max_batch_tokens: int = 16384  # padded tokens per forward
    head_chunk: int = 512  # supervised positions per head matmul
    # vllm
    url: str = "http://127.0.0.1:8000"
    model: str = ""  # the served model name
    docs_per_request: int = 4
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    api_key_env: str = ""  # name of the environment variable holding an API key, if needed

    def validate(self) -> None:
        if self.backend == "hf" and not self.path:
            raise ConfigError("path: the hf backend needs a model directory")
        if self.backend == "vllm" and not (self.model and self.url.startswith(("http://", "https://"))):
            raise ConfigError("url/model: the vllm backend needs an http(s) url and the served model name")
        for key in ("max_batch_tokens", "head_chunk", "docs_per_request", "concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigError("max_retries/timeout_s/backoff_s: must be >= 0, > 0, >= 0")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if self.backend == "vllm" and self.temperature != 1.0:
            raise ConfigError("temperature: the vllm backend returns the raw distribution; use 1.0 "
                              "(apply a KD temperature in the loss spec instead)")

    @property
    def teacher_id(self) -> str:
        return self.name or (self.path.rstrip("/") if self.backend == "hf" else self.model)


def load_teacher_config(path) -> TeacherConfig:
    return load_section(path, TeacherConfig, "teacher")


@dataclass
class DocScores:
    ids: np.ndarray  # [n, K'] int64 known ids (top-k, then tail samples)
    logprobs: np.ndarray  # [n, K'] float32
    label_logprob: np.ndarray  # [n] float32
    rest_logmass: np.ndarray  # [n] float32: log teacher mass outside the known ids


def targets_from_logits(logits: torch.Tensor, labels: torch.Tensor, top_k: int, tail_samples: int = 0,
                        temperature: float = 1.0, generator: torch.Generator | None = None):
    """(ids, logprobs, label_logprob, rest_logmass) tensors from teacher logits [n, V]."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = lp.topk(top_k, dim=-1)
    ids, lps = top.indices, top.values
    label_lp = lp.gather(1, labels[:, None]).squeeze(1)
    outside = lp.scatter(1, ids, float("-inf"))
    if tail_samples:
        probs = torch.exp(outside)  # rows sum to the tail mass; multinomial normalises
        samples = torch.multinomial(probs, tail_samples, replacement=False, generator=generator)
        ids, lps = torch.cat([ids, samples], 1), torch.cat([lps, lp.gather(1, samples)], 1)
        outside.scatter_(1, samples, float("-inf"))
    rest = torch.logsumexp(outside, dim=-1).clamp_min(TEACHER_LOGP_FLOOR)
    return ids, lps, label_lp, rest


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFTeacher:
    """A local HF causal LM (e.g. GptOssForCausalLM); bf16 on GPU; documents batched by length."""

    def __init__(self, cfg: TeacherConfig, top_k: int, tail_samples: int = 0, seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.cfg, self.top_k, self.tail_samples = cfg, top_k, tail_samples
        self.device = _resolve_device(cfg.device)
        kwargs = {"dtype": getattr(torch, cfg.dtype)}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if not os.path.isdir(cfg.path):
            raise TeacherError(f"teacher path {cfg.path}: not a directory")
        self.model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs).to(self.device).eval()
        self.base = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        vocab = self.head.weight.shape[0]
        if top_k + tail_samples >= vocab:
            raise TeacherError(f"top_k + tail_samples = {top_k + tail_samples} must be < teacher vocab {vocab}")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # a model trained on a vocabulary subset (vpmoe.data.vocab_subset) reads and writes full ids
        from vpmoe.data.vocab_subset import VocabSubset
        self.subset = VocabSubset.find(cfg.path)

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _batches(self, docs):
        """Document index groups, longest first, each within max_batch_tokens padded tokens."""
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i][0]))
        batch: list[int] = []
        for i in order:
            if batch and len(docs[batch[0]][0]) * (len(batch) + 1) > self.cfg.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def score_docs(self, docs) -> list[DocScores]:
        results: list[DocScores | None] = [None] * len(docs)
        for batch in self._batches(docs):
            for j, scores in zip(batch, self._forward([docs[j] for j in batch])):
                results[j] = scores
        return results

    @torch.no_grad()
    def hidden_at_docs(self, docs) -> torch.Tensor:
        """hidden_at over any number of documents (batched by length), rows in document order."""
        per_doc: list[torch.Tensor | None] = [None] * len(docs)
        for batch in self._batches(docs):
            hidden, _ = self.hidden_at([docs[j] for j in batch])
            for j, part in zip(batch, hidden.split([len(docs[j][1]) for j in batch])):
                per_doc[j] = part
        return torch.cat(per_doc)

    def hidden_at(self, docs):
        """Final hidden states [n, d_t] at the documents' supervised positions, and their labels [n]."""
        length = max(len(t) for t, _ in docs)
        ids = torch.zeros(len(docs), length, dtype=torch.long)
        mask = torch.zeros(len(docs), length, dtype=torch.long)
        for b, (tokens, _) in enumerate(docs):
            ids[b, :len(tokens)] = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
            mask[b, :len(tokens)] = 1
        if self.subset is not None:
            ids = self.subset.to_compact(ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.base(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, (_, p) in enumerate(docs)])
        cols = torch.cat([torch.as_tensor(np.asarray(p, dtype=np.int64)) for _, p in docs])
        rows, cols = rows.to(self.device), cols.to(self.device)
        return hidden[rows, cols], ids[rows, cols + 1]

    def _forward(self, docs) -> list[DocScores]:
        hidden, labels = self.hidden_at(docs)
        parts = []
        for c0 in range(0, len(labels), self.cfg.head_chunk):
            sl = slice(c0, c0 + self.cfg.head_chunk)
            out = targets_from_logits(self.logits_at(hidden[sl]), labels[sl], self.top_k, self.tail_samples,
                                      self.cfg.temperature, self.generator)
            parts.append([t.cpu() for t in out])
        merged = [torch.cat([p[i] for p in parts]) for i in range(4)]
        if self.subset is not None:  # the cache stores full-vocabulary ids
            merged[0] = self.subset.to_full(merged[0])
        results, start = [], 0
        for _, positions in docs:
            sl = slice(start, start + len(positions))
            start += len(positions)
            results.append(DocScores(merged[0][sl].numpy().astype(np.int64), merged[1][sl].numpy(),
                                     merged[2][sl].numpy(), merged[3][sl].numpy()))
        return results


class VLLMTeacher:
    """Client of an OpenAI-compatible vLLM server (`prompt_logprobs`), concurrent with retries."""

    def __init__(self, cfg: TeacherConfig, top_k: int, tail_samples: int = 0, sleep=time.sleep):
        if tail_samples:
            raise TeacherError("the vllm backend cannot draw tail samples (prompt_logprobs gives top-k only); "
                               "set tail_samples = 0")
        self.cfg, self.top_k, self.sleep = cfg, top_k, sleep
        self.stopping = False  # set when a request fails or Ctrl-C: retries and queued requests stop
        self.endpoint = cfg.url.rstrip("/") + "/v1/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise TeacherError(f"api_key_env: environment variable {cfg.api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def score_docs(self, docs) -> list[DocScores]:
        """Concurrent requests of `docs_per_request` documents. A failure or an interrupt (Ctrl-C)
        cancels the queued requests and stops every retry at once (`self.stopping`); a request
        already on the wire ends at its own timeout."""
        groups = [list(range(i, min(i + self.cfg.docs_per_request, len(docs))))
                  for i in range(0, len(docs), self.cfg.docs_per_request)]
        results: list[DocScores | None] = [None] * len(docs)
        self.stopping = False
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        try:
            futures = [pool.submit(self._score_group_or_stop, [docs[i] for i in g]) for g in groups]
            for group, future in zip(groups, futures):
                for i, s in zip(group, future.result()):
                    results[i] = s
        except BaseException:
            self.stopping = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results

    def _score_group_or_stop(self, docs) -> list[DocScores]:
        """`_score_group` in a worker: a failure sets `stopping` here, before this worker takes the
        next queued request (set only by `score_docs`, it raced the worker on a loaded machine and
        one queued request could still go out)."""
        try:
            return self._score_group(docs)
        except BaseException:
            self.stopping = True
            raise

    def _score_group(self, docs) -> list[DocScores]:
        body = {"model": self.cfg.model, "prompt": [[int(t) for t in tokens] for tokens, _ in docs],
                "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": self.top_k}
        reply = self.post(body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise TeacherError(f"{self.endpoint}: the reply is not a completions object with a 'choices' list "
                               f"(got {str(reply)[:200]!r})")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        if len(choices) != len(docs):
            raise TeacherError(f"{self.endpoint}: {len(choices)} choices for {len(docs)} prompts")
        return [self.parse_choice(c, tokens, positions) for c, (tokens, positions) in zip(choices, docs)]

    def post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if self.stopping:  # another request failed, or Ctrl-C: no new attempt
                raise TeacherError(f"{self.endpoint}: stopped")
            if attempt:
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1))
                self.sleep(delay * (0.5 + random.random() / 2))  # jitter: concurrent clients spread out
            request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_HTTP:
                    raise TeacherError(f"{self.endpoint}: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"  # (a body cut short: IncompleteRead)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"invalid JSON reply ({e})"
        raise TeacherError(f"{self.endpoint}: request failed after {self.cfg.max_retries + 1} attempts; "
                           f"last error: {last}")

    def parse_choice(self, choice: dict, tokens, positions) -> DocScores:
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(tokens):
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise TeacherError(f"{self.endpoint}: prompt_logprobs has {got} entries for a {len(tokens)}-token "
                               "prompt (is the server vLLM with prompt_logprobs support?)")
        k, n = self.top_k, len(positions)
        ids = np.zeros((n, k), np.int64)
        lps = np.zeros((n, k), np.float32)
        label_lp = np.zeros(n, np.float32)
        for row, t in enumerate(positions):
            entry = entries[int(t) + 1]  # entry i scores prompt token i given tokens[:i]
            if not entry:
                raise TeacherError(f"{self.endpoint}: no prompt log-probs at position {int(t) + 1}")
            try:
                cand = {int(tid): float(v["logprob"] if isinstance(v, dict) else v) for tid, v in entry.items()}
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise TeacherError(f"{self.endpoint}: malformed prompt log-probs at position {int(t) + 1} "
                                   f"({type(e).__name__}: {e}; expected {{token id: {{'logprob': x}}}})") from None
            label = int(tokens[int(t) + 1])
            if label not in cand:
                raise TeacherError(f"{self.endpoint}: position {int(t) + 1} lacks the prompt token {label}")
            label_lp[row] = cand[label]
            best = sorted(cand.items(), key=lambda kv: -kv[1])[:k]
            if len(best) < k:
                raise TeacherError(f"{self.endpoint}: {len(best)} log-probs at position {int(t) + 1}, need top_k={k} "
                                   "(start vLLM with --max-logprobs >= top_k)")
            ids[row], lps[row] = [b[0] for b in best], [b[1] for b in best]
        covered = np.exp(lps.astype(np.float64)).sum(1)
        rest = np.log(np.maximum(1.0 - covered, math.exp(TEACHER_LOGP_FLOOR)))
        return DocScores(ids, lps, label_lp, rest.astype(np.float32))


def make_teacher(cfg: TeacherConfig, top_k: int, tail_samples: int = 0, seed: int = 0):
    if cfg.backend == "hf":
        return HFTeacher(cfg, top_k, tail_samples, seed)
    return VLLMTeacher(cfg, top_k, tail_samples)

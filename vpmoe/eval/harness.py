"""Log-likelihood scoring and greedy generation through the HF causal-LM interface.

Design choices:
- A request is a (context, continuation) pair of strings, tokenised the way lm-evaluation-harness
  does for causal models: trailing whitespace of the context moves into the continuation, the whole
  string is encoded, the context is encoded, and the continuation is the tail of the whole beyond
  the context's length. So our per-choice log-likelihoods can be checked against lm-eval's
  `HFLM.loglikelihood` on the same pairs (tests/test_eval_crosscheck.py).
- Each scored request yields the summed log-prob of the continuation, its token count (so callers
  can take the per-token mean that DCLM CORE ranks choices by), whether every continuation token is
  the greedy argmax, and how many are.
- Batches keep request order (deterministic), are right-padded and bounded by a token budget.
  Right padding needs no attention mask in a causal model: padding sits after every real position.
  When the model's forward takes `logits_to_keep`, only the positions that score continuations get
  logits, which keeps [rows, positions, 201088] small on long few-shot prompts.
- Sequences longer than the model's context are cut from the left, as lm-eval does.
- Greedy generation uses `generate()` (with a fresh greedy GenerationConfig, so a checkpoint's
  sampling defaults never leak in) when the model has it, else a plain full-recompute loop.
- Many prompts (`greedy_generate_many`): a vpMoE, bare, in its HF wrapper or behind a vocabulary
  subset (`loading.SubsetCausalLM`), decodes them as left-padded rows of one batch through
  `vpmoe.model.generate` (its fixed-shape cache and, on a GPU, its decode step captured as a CUDA
  graph), `GENERATE_ROWS` at a time, shortest prompts together. One prompt at a time through
  transformers' generate, each decode step is launched eagerly for one row (on an H100 at 80
  layers the eager grouped step decodes 2.5 tokens/s, the captured step 24, at one row,
  bench/RESULTS.md 2026-12-05; transformers' generate itself was not timed);
  a subset model had only the full-recompute loop. Other models go one prompt at a time as before.
  The tokens are the same (tests/test_eval_suites.py, tests/test_eval_subset.py check them against
  the one-at-a-time paths).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vpmoe.cli import UserError


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over continuation tokens of log p(token | prefix)
    n_tokens: int
    is_greedy: bool  # every continuation token is the argmax
    n_greedy: int  # continuation tokens that are the argmax

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.n_tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal `_encode_pair`; an empty context becomes
    the tokenizer's prefix token (BOS, else end-of-text), as in lm-eval's `loglikelihood`."""
    if context == "":
        cont = tokenizer.encode_ordinary(continuation)
        if cont and cont[0] == tokenizer.prefix_id:
            return cont[:1], cont[1:]
        return [tokenizer.prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def model_max_length(model) -> int | None:
    """The longest sequence the model accepts, from its config (None: no known limit)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    return value if isinstance(value, int) and value > 0 else None


def forward_kwargs(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise UserError(f"the model's forward returned {type(out).__name__} without logits")
    return logits


@torch.no_grad()
def call_logits(model, input_ids: torch.Tensor, keep: int = 0, **extra) -> torch.Tensor:
    """Logits of the last `keep` positions (all positions when keep is 0 or unsupported)."""
    params = forward_kwargs(model)
    kwargs = dict(extra)
    if "use_cache" in params or "kwargs" in params:
        kwargs["use_cache"] = False
    if keep and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    logits = logits_of(model(input_ids=input_ids, **kwargs))
    return logits[:, -keep:] if keep else logits


def truncate_left(ctx: list[int], cont: list[int], max_len: int | None) -> tuple[list[int], int]:
    """(model input ids, continuation length): input is (ctx + cont)[:-1], cut from the left."""
    if not cont:
        raise ValueError("empty continuation: nothing to score")
    seq = ctx + cont
    if max_len is not None:
        if len(cont) > max_len:
            raise UserError(f"a continuation of {len(cont)} tokens exceeds the model's {max_len}-token context")
        seq = seq[-(max_len + 1):]
    return seq[:-1], len(cont)


@torch.no_grad()
def score_token_pairs(model, pairs: list[tuple[list[int], list[int]]], batch_tokens: int = 8192,
                      max_rows: int = 64, pad_id: int = 0, logit_positions: int = 2048) -> list[Scored]:
    """Score (context ids, continuation ids) pairs; results in input order.

    A batch grows while its padded size stays within `batch_tokens` and, when the model can return
    only the last positions' logits, while rows x kept positions stays within `logit_positions`
    (so rows whose continuations sit far apart, e.g. different items, do not make every row pay
    the head and the [rows, positions, vocab] tensor for the whole span between them).
    """
    max_len = model_max_length(model)
    device = model_device(model)
    can_keep = "logits_to_keep" in forward_kwargs(model)
    rows = []
    for ctx, cont in pairs:
        inp, n_cont = truncate_left(list(ctx), list(cont), max_len)
        rows.append((inp, list(cont), n_cont))
    results: list[Scored] = []
    start = 0
    while start < len(rows):
        # position p predicts token p+1: row i's continuation is predicted by its last n_cont positions
        end, longest, first_needed = start, 0, None
        while end < len(rows) and end - start < max_rows:
            inp, _, n = rows[end]
            longest_if = max(longest, len(inp))
            first_if = len(inp) - n if first_needed is None else min(first_needed, len(inp) - n)
            n_rows = end - start + 1
            if end > start and (longest_if * n_rows > batch_tokens
                                or can_keep and (longest_if - first_if) * n_rows > logit_positions):
                break
            longest, first_needed, end = longest_if, first_if, end + 1
        batch = rows[start:end]
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        for i, (inp, _, _) in enumerate(batch):
            ids[i, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        keep = longest - first_needed
        logits = call_logits(model, ids.to(device), keep=keep)
        offset = longest - logits.shape[1]  # absolute position of logits[:, 0]
        for i, (inp, cont, n) in enumerate(batch):
            lo = len(inp) - n - offset
            logp = F.log_softmax(logits[i, lo:lo + n].float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            token_logp = logp.gather(-1, target[:, None]).squeeze(-1)
            greedy = logp.argmax(-1) == target
            results.append(Scored(float(token_logp.sum()), n, bool(greedy.all()), int(greedy.sum())))
        start = end
    return results


def score_requests(model, tokenizer, requests: list[Request], batch_tokens: int = 8192) -> list[Scored]:
    pairs = [encode_pair(tokenizer, r.context, r.continuation) for r in requests]
    return score_token_pairs(model, pairs, batch_tokens=batch_tokens, pad_id=tokenizer.eos_id)


# prompts per batched generate call in `greedy_generate_many` (the cache and the captured decode
# step are per call; rows finished early decode on as padding until the batch's last stops)
GENERATE_ROWS = 64


def _new_token_budget(model, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, cut so prompt + continuation stays within the model's context."""
    max_len = model_max_length(model)
    return max(0, min(max_new_tokens, max_len - prompt_len)) if max_len is not None else max_new_tokens


@torch.no_grad()
def greedy_generate_many(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                         seed: int = 0, progress=None) -> list[list[int]]:
    """`greedy_generate` of each prompt, batched for a vpMoE (module docstring)."""
    from vpmoe.eval.loading import SubsetCausalLM, inner_vpmoe

    inner, subset = inner_vpmoe(model), None
    if isinstance(model, SubsetCausalLM):  # a subset-trained vpMoE: generate maps its ids both ways
        inner, subset = inner_vpmoe(model.inner), model.subset
        for p in prompts:
            model.compact(torch.as_tensor(p, dtype=torch.long))  # an id outside the subset: refused by name
    if inner is None:
        out = []
        for i, prompt in enumerate(prompts):
            if progress and i % 8 == 0:
                progress(f"generate: prompt {i + 1}/{len(prompts)}")
            out.append(greedy_generate(model, prompt, max_new_tokens, stop_ids, seed=seed))
        return out
    from vpmoe.model.generate import generate

    budgets = [_new_token_budget(model, len(p), max_new_tokens) for p in prompts]
    order = sorted((i for i in range(len(prompts)) if budgets[i] > 0), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), GENERATE_ROWS):
        rows = order[start:start + GENERATE_ROWS]
        if progress:
            progress(f"generate: prompts {start + 1}-{start + len(rows)} of {len(order)} as one batch")
        # each row stops at its first stop id (kept); a row with a smaller budget is cut to it, which
        # greedy decoding makes the same as stopping there
        # padding: the longest prompt's first id (masked out; inside any vocabulary or subset the
        # prompts are); all empty: generate says so
        pad = (prompts[rows[-1]] or [0])[0]
        got = generate(inner, [prompts[i] for i in rows], max(budgets[i] for i in rows),
                       stop_ids=list(stop_ids), seed=seed, subset=subset, pad_id=pad)
        for i, tokens in zip(rows, got):
            out[i] = tokens[:budgets[i]]
    return out


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                    seed: int = 0) -> list[int]:
    """Greedy continuation of one prompt, cut after the first stop id (which is kept)."""
    torch.manual_seed(seed)  # greedy needs no randomness; fixed anyway so nothing can vary
    device = model_device(model)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    max_new_tokens = _new_token_budget(model, len(prompt_ids), max_new_tokens)
    if max_new_tokens == 0:
        return []
    if hasattr(model, "generate") and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                  eos_token_id=list(stop_ids), pad_token_id=stop_ids[0],
                                  num_beams=1, temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = out[0, len(prompt_ids):].tolist()
    else:
        new = []
        for _ in range(max_new_tokens):
            logits = call_logits(model, ids, keep=1)
            nxt = int(logits[0, -1].float().argmax())
            new.append(nxt)
            if nxt in stop_ids:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    for i, t in enumerate(new):
        if t in stop_ids:
            return new[:i + 1]
    return new

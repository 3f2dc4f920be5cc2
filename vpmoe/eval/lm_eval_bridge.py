"""Optional bridge to lm-evaluation-harness: wrap an in-memory model as lm-eval's `HFLM`.

Design choices:
- lm-eval is an optional extra (`pip install vpmoe[lm-eval]`): it is imported inside the functions,
  never at module import, and a missing install raises a UserError that says what to install.
- lm-eval needs a transformers tokenizer. A model that uses o200k_harmony (our exports ship no
  tokenizer files) gets one built offline from the same checked vocabulary file vpmoe.tokenizer uses,
  with every Harmony special token at its o200k_harmony id; `loading.hf_tokenizer_is_o200k` can
  confirm it encodes like vpmoe.tokenizer.
- Used two ways: the cross-check test scores the same (context, continuation) pairs with our
  harness and with `HFLM.loglikelihood`; and `run_lm_eval_tasks` runs lm-eval's own task registry on
  our model (its datasets come from the HF hub, so that part needs a network).
"""
from __future__ import annotations

import functools

from vpmoe.cli import UserError


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}); install the optional extra: "
                        "pip install 'lm-eval[hf]>=0.4' (or vpmoe[lm-eval])") from None
    return HFLM


@functools.lru_cache(maxsize=1)
def o200k_hf_tokenizer():
    """o200k_harmony as a `PreTrainedTokenizerFast` (built offline in a few seconds, cached)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from vpmoe import tokenizer as tk

    vocab = tk.prepare_vocab_dir() / tk.VOCAB_FILE_NAME
    specials = [name for name, _ in sorted(tk.SPECIAL_TOKENS.items(), key=lambda kv: kv[1])]
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=tk.PATTERN,
                                extra_special_tokens=specials).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", model_max_length=1 << 30)
    # specials are appended after the 199998 BPE ids in id order, which is exactly o200k_harmony
    got = hf.convert_tokens_to_ids(specials[:2] + specials[-1:])
    want = [tk.SPECIAL_TOKENS[s] for s in specials[:2] + specials[-1:]]
    if got != want:
        raise RuntimeError(f"o200k HF tokenizer: special ids {got} != o200k_harmony {want}")
    return hf


def hf_tokenizer_for(tokenizer):
    """The transformers tokenizer for an EvalTokenizer (its own, or o200k rebuilt)."""
    if getattr(tokenizer, "hf", None) is not None:
        return tokenizer.hf
    if getattr(tokenizer, "o200k_compatible", False):
        return o200k_hf_tokenizer()
    raise UserError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has no transformers form for lm-eval")


def make_hflm(model, tokenizer, batch_size: int = 1, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory HF causal LM (our VpMoEForCausalLM, Qwen3, ...)."""
    HFLM = require_lm_eval()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        from vpmoe.eval.loading import as_causal_lm
        model = as_causal_lm(model)
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"lm-eval's HFLM needs a transformers PreTrainedModel, got {type(model).__name__}")
    return HFLM(pretrained=model, tokenizer=hf_tokenizer_for(tokenizer), backend="causal",
                batch_size=batch_size, max_length=max_length)


def lm_eval_loglikelihood(hflm, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum log-prob, is_greedy) per (context, continuation), computed by lm-eval itself."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i)
                for i, (ctx, cont) in enumerate(pairs)]
    return [(float(lp), bool(g)) for lp, g in hflm.loglikelihood(requests, disable_tqdm=True)]


def lm_eval_continuation_lengths(hflm, pairs: list[tuple[str, str]]) -> list[int]:
    """How many continuation tokens lm-eval scores for each pair (its own `_encode_pair`)."""
    return [len(hflm._encode_pair(ctx, cont)[1]) for ctx, cont in pairs]


def run_lm_eval_tasks(model, tokenizer, tasks: list[str], num_fewshot: int | None = None,
                      limit: int | None = None, batch_size: int = 1, seed: int = 0) -> dict:
    """Run lm-eval tasks on an in-memory model: registry names (e.g. ["arc_challenge", "hellaswag"],
    whose datasets come from the HF hub: network) or inline task-config dicts (a local dataset works
    offline). Returns lm-eval's `results` table."""
    require_lm_eval()
    import lm_eval

    from lm_eval.tasks import TaskManager

    hflm = make_hflm(model, tokenizer, batch_size=batch_size)
    # task configs given inline (dicts) need no scan of lm-eval's thousands of built-in task files
    manager = TaskManager(include_defaults=not all(isinstance(t, dict) for t in tasks))
    out = lm_eval.simple_evaluate(model=hflm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, log_samples=False, task_manager=manager)
    return {} if out is None else out.get("results", {})

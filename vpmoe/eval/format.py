"""Harmony format validity: does greedy generation produce `analysis` then `final`, properly closed?

Design choices:
- Prompts are Harmony conversations (system + developer + user) rendered by the official
  `openai-harmony` renderer for completion, so they end with `<|start|>assistant` exactly as at
  inference. The system/developer messages come from the data pipeline's prompt config
  (vpmoe/assets/harmony_prompt.json), i.e. what the model was trained with; the user turns are the
  held-out prompts of the valid split when `--data` is given, else a fixed built-in set.
- Greedy decoding (fixed seed) until `<|return|>`, `<|call|>` or `<|endoftext|>`, at most
  `max_new_tokens`. A completion is valid when it stopped on `<|return|>`, `openai-harmony`'s
  `parse_messages_from_completion_tokens` (strict) accepts it, and it is exactly one assistant
  `analysis` message then one assistant `final` message, both non-empty. Every invalid output is
  counted under the first reason it fails, so a low score says what to fix.
- Lengths are token counts of each message's text (o200k), over valid outputs.
- Needs the o200k_harmony tokenizer; any other tokenizer gets "not applicable".
"""
from __future__ import annotations

import statistics

from vpmoe.eval.harness import greedy_generate_many

BUILTIN_USER_PROMPTS = (
    "What is 17 multiplied by 23?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Translate 'Where is the train station?' into French.",
    "List three prime numbers greater than 50.",
    "What is the capital of Australia?",
    "Summarise the water cycle in one paragraph.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Give a synonym for 'happy' and use it in a sentence.",
    "What is the derivative of x^3 + 2x?",
    "Name the largest planet in the solar system and one fact about it.",
    "Convert 5 miles to kilometres.",
    "Quelle est la différence entre un virus et une bactérie ?",
    "Why do leaves change colour in autumn?",
    "Sort these numbers in ascending order: 42, 7, 19, 3, 88.",
    "What does the Python expression len('hello') return?",
)
FAILURES = ("no_stop", "wrong_stop", "parse_error", "wrong_roles", "wrong_channels", "empty_message")


def render_prompts(user_texts: list[str], prompt_config=None) -> list[list[int]]:
    """Harmony system + developer + user, ending with `<|start|>assistant` (token ids)."""
    import openai_harmony as h

    from vpmoe import tokenizer as tk
    from vpmoe.data.prompt import load_prompt

    prompt_config = prompt_config or load_prompt()
    encoding = tk.load_harmony_encoding()
    out = []
    for text in user_texts:
        conversation = h.Conversation.from_messages([
            h.Message.from_role_and_content(h.Role.SYSTEM, prompt_config.system_content()),
            h.Message.from_role_and_content(h.Role.DEVELOPER, prompt_config.developer_content()),
            h.Message.from_role_and_content(h.Role.USER, text),
        ])
        out.append(list(encoding.render_conversation_for_completion(conversation, h.Role.ASSISTANT)))
    return out


def message_text(message) -> str:
    return "".join(getattr(c, "text", "") for c in message.content)


def check_completion(tokens: list[int]) -> tuple[str | None, dict]:
    """(failure reason or None, {channel: text}) for one completion after `<|start|>assistant`."""
    import openai_harmony as h

    from vpmoe import tokenizer as tk

    if not tokens or tokens[-1] not in (tk.RETURN_ID, tk.CALL_ID, tk.EOD_ID):
        return "no_stop", {}
    if tokens[-1] != tk.RETURN_ID:
        return "wrong_stop", {}
    try:
        messages = tk.load_harmony_encoding().parse_messages_from_completion_tokens(tokens, h.Role.ASSISTANT, strict=True)
    except Exception:  # HarmonyError, or a decode error on malformed bytes
        return "parse_error", {}
    if any(m.author.role != h.Role.ASSISTANT for m in messages):
        return "wrong_roles", {}
    if [m.channel for m in messages] != ["analysis", "final"]:
        return "wrong_channels", {}
    texts = {m.channel: message_text(m) for m in messages}
    if not texts["analysis"].strip() or not texts["final"].strip():
        return "empty_message", texts
    return None, texts


def length_stats(values: list[int]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "median": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def run_format(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 512, seed: int = 0,
               source: str = "builtin", keep_samples: int = 3, progress=None) -> dict:
    """Generate greedily for every prompt and score Harmony validity."""
    from vpmoe import tokenizer as tk

    if not tokenizer.o200k_compatible:
        return {"applicable": False, "reason": f"tokenizer {tokenizer.name} is not o200k_harmony; Harmony "
                                               "validity is only defined for models on the o200k_harmony tokenizer"}
    stops = [tk.RETURN_ID, tk.CALL_ID, tk.EOD_ID]
    failures = {name: 0 for name in FAILURES}
    analysis_lens, final_lens, completion_lens, samples = [], [], [], []
    n_valid = 0
    completions = greedy_generate_many(model, prompts, max_new_tokens, stops, seed=seed,
                                       progress=(lambda m: progress(f"format: {m}")) if progress else None)
    for i, completion in enumerate(completions):
        completion_lens.append(len(completion))
        reason, texts = check_completion(completion)
        if reason is None:
            n_valid += 1
            analysis_lens.append(len(tokenizer.encode_ordinary(texts["analysis"])))
            final_lens.append(len(tokenizer.encode_ordinary(texts["final"])))
        else:
            failures[reason] += 1
        if len(samples) < keep_samples:
            samples.append({"prompt_index": i, "valid": reason is None, "failure": reason,
                            "completion": tk.decode(completion)[:400]})
    n = len(prompts)
    return {"applicable": True, "source": source, "n_prompts": n, "max_new_tokens": max_new_tokens,
            "n_valid": n_valid, "valid_rate": n_valid / n if n else None, "failures": failures,
            "analysis_tokens": length_stats(analysis_lens), "final_tokens": length_stats(final_lens),
            "completion_tokens": length_stats(completion_lens), "samples": samples}

"""Numbers: how they tokenise, and whether the model copies them exactly.

Design choices:
- Tokenisation counts are a fixed list of number-heavy strings (integers of growing length,
  decimals, thousands separators, dates, scientific notation, money, a phone number, a hex id),
  encoded with the model's tokenizer. They change only with the tokenizer, so they are the check
  that a tokenizer transplant or a different tokenizer splits digits the way we think (o200k splits
  digit runs into groups of at most three).
- Copy accuracy uses few-shot prompts `Input: N\\nOutput: N\\n` (3 solved examples, then the query)
  and scores the continuation " N\\n" with the log-likelihood harness: a copy is exact when every
  continuation token is the greedy argmax, which is exactly "greedy decoding reproduces the number
  and then ends the line", at the cost of one forward pass instead of a generation loop. Per-token
  greedy accuracy and mean log-prob give partial credit for early checkpoints.
- Numbers are drawn by a seeded RNG across kinds (short/medium/long integers, decimals, grouped,
  negative), so two runs score the same prompts and each kind gets its own rate.
"""
from __future__ import annotations

import random

from vpmoe.eval.harness import Request, score_requests

NUMBER_STRINGS = (
    "7", "42", "365", "2026", "65536", "1234567", "3141592653", "12345678901234567890",
    "3.14159", "0.000123", "-273.15", "1,234,567", "1,000,000.00", "$19.99", "6.022e23",
    "2026-01-01", "12:34:56", "+1 (555) 010-9999", "0x1F4A9C", "99.9%",
)
KINDS = ("int_1_3", "int_4_6", "int_7_9", "int_10_15", "decimal", "grouped", "negative")
INSTRUCTION = "Copy the number exactly.\n"
N_SHOTS = 3


def tokenization_counts(tokenizer, strings=NUMBER_STRINGS) -> dict:
    rows = []
    for s in strings:
        ids = tokenizer.encode_ordinary(s)
        rows.append({"text": s, "n_tokens": len(ids), "chars_per_token": len(s) / len(ids),
                     "pieces": [tokenizer.decode([t]) for t in ids]})
    digits = sum(sum(ch.isdigit() for ch in r["text"]) for r in rows)
    return {"strings": rows, "total_tokens": sum(r["n_tokens"] for r in rows),
            "total_chars": sum(len(r["text"]) for r in rows), "total_digits": digits}


def random_number(rng: random.Random, kind: str) -> str:
    def digits(n: int) -> str:
        return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))

    if kind == "int_1_3":
        return digits(rng.randint(1, 3))
    if kind == "int_4_6":
        return digits(rng.randint(4, 6))
    if kind == "int_7_9":
        return digits(rng.randint(7, 9))
    if kind == "int_10_15":
        return digits(rng.randint(10, 15))
    if kind == "decimal":
        return f"{digits(rng.randint(1, 4))}.{''.join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 5)))}"
    if kind == "grouped":
        return f"{int(digits(rng.randint(4, 10))):,}"
    if kind == "negative":
        return "-" + digits(rng.randint(1, 6))
    raise ValueError(f"unknown number kind {kind!r}")


def copy_requests(n: int, seed: int) -> list[tuple[str, Request]]:
    """(kind, request) pairs: kinds cycle so each gets n / len(KINDS) prompts."""
    rng = random.Random(f"vpmoe-numeric/{seed}")
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        shots = [random_number(rng, KINDS[(i + j + 1) % len(KINDS)]) for j in range(N_SHOTS)]
        target = random_number(rng, kind)
        context = INSTRUCTION + "".join(f"Input: {s}\nOutput: {s}\n" for s in shots) + f"Input: {target}\nOutput:"
        out.append((kind, Request(context, f" {target}\n")))
    return out


def copy_accuracy(model, tokenizer, n: int = 70, seed: int = 0, batch_tokens: int = 8192) -> dict:
    pairs = copy_requests(n, seed)
    scores = score_requests(model, tokenizer, [r for _, r in pairs], batch_tokens=batch_tokens)
    by_kind: dict[str, dict] = {k: {"n": 0, "exact": 0, "tokens": 0, "greedy_tokens": 0} for k in KINDS}
    for (kind, _), s in zip(pairs, scores):
        row = by_kind[kind]
        row["n"] += 1
        row["exact"] += int(s.is_greedy)
        row["tokens"] += s.n_tokens
        row["greedy_tokens"] += s.n_greedy
    for row in by_kind.values():
        row["exact_rate"] = row["exact"] / row["n"] if row["n"] else None
        row["token_accuracy"] = row["greedy_tokens"] / row["tokens"] if row["tokens"] else None
    total_tokens = sum(s.n_tokens for s in scores)
    return {"n_prompts": n, "n_shots": N_SHOTS,
            "exact_rate": sum(s.is_greedy for s in scores) / n if n else None,
            "token_accuracy": sum(s.n_greedy for s in scores) / total_tokens if total_tokens else None,
            "mean_logprob_per_token": sum(s.logprob for s in scores) / total_tokens if total_tokens else None,
            "by_kind": by_kind, "example_prompt": pairs[0][1].context + pairs[0][1].continuation if pairs else None}


def run_numeric(model, tokenizer, n_copy: int = 70, seed: int = 0, batch_tokens: int = 8192) -> dict:
    return {"tokenization": tokenization_counts(tokenizer),
            "copy": copy_accuracy(model, tokenizer, n_copy, seed, batch_tokens)}

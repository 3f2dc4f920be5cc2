"""CORE-8: the DCLM CORE subset nanochat reports, scored like DCLM / nanochat.

Design choices:
- Prompts follow nanochat's core_eval templates: k few-shot examples, each rendered as
  `prompt + delimiter + answer` and followed by a blank line, then the item. Multiple choice: one
  request per choice (context = few-shot + query + delimiter, continuation = choice). Schema: one
  request per context option (context = few-shot + option + delimiter, continuation shared).
  Language modelling: one request (context = few-shot + stripped context + delimiter).
- Multiple choice and schema pick the option with the highest mean log-prob per continuation token
  (DCLM's rule, = lowest mean loss in nanochat); ties go to the first option. Language modelling is
  correct when every continuation token is the greedy argmax. Continuation tokens are split as
  lm-evaluation-harness does (harness.encode_pair), which is also DCLM's context/continuation split.
- Deterministic selection: with `max_per_task` N, the task's items are shuffled by a seeded RNG
  and the first N kept; few-shot examples for item i are sampled (excluding i) from the full task by
  an RNG seeded with (seed, label, i). String seeds are hashed by `random` with sha512, so this does
  not depend on PYTHONHASHSEED.
- Centered accuracy = (acc - b) / (1 - b), b the bundle's random baseline (percent / 100); the
  suite score is the mean centered accuracy over the tasks that ran (nanochat's CORE metric), with
  the missing tasks listed beside it so a partial mean is never mistaken for the full one.
"""
from __future__ import annotations

import random
from pathlib import Path

from vpmoe.eval.bundle import TASK_TYPES, TaskSpec, read_task_items, read_task_specs, sha256_file
from vpmoe.eval.harness import Request, Scored, score_requests

CORE8 = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "boolq", "commonsense_qa", "piqa", "winogrande")
FEWSHOT_SEPARATOR = "\n\n"


def render_fewshot(spec: TaskSpec, examples: list[dict]) -> str:
    """The few-shot block: each solved example, then a blank line."""
    parts = []
    for ex in examples:
        if spec.task_type == "multiple_choice":
            parts.append(f"{ex['query']}{spec.delimiter}{ex['choices'][ex['gold']]}")
        elif spec.task_type == "schema":
            parts.append(f"{ex['context_options'][ex['gold']]}{spec.delimiter}{ex['continuation']}")
        else:
            parts.append(f"{ex['context'].strip()}{spec.delimiter}{ex['continuation']}")
    return "".join(p + FEWSHOT_SEPARATOR for p in parts)


def item_requests(spec: TaskSpec, item: dict, fewshot: list[dict]) -> list[Request]:
    """The (context, continuation) requests one item needs: one per option, or one for LM."""
    prefix = render_fewshot(spec, fewshot)
    if spec.task_type == "multiple_choice":
        context = f"{prefix}{item['query']}{spec.delimiter}"
        return [Request(context, choice) for choice in item["choices"]]
    if spec.task_type == "schema":
        return [Request(f"{prefix}{option}{spec.delimiter}", item["continuation"])
                for option in item["context_options"]]
    if spec.task_type == "language_modeling":
        return [Request(f"{prefix}{item['context'].strip()}{spec.delimiter}", item["continuation"])]
    raise ValueError(f"task {spec.label}: unsupported type {spec.task_type!r}")


def select_indices(n_items: int, label: str, seed: int, max_per_task: int | None) -> list[int]:
    """Which items to evaluate: all in file order, or the first N of a seeded shuffle."""
    order = list(range(n_items))
    if max_per_task is None or max_per_task < 0 or max_per_task >= n_items:
        return order
    random.Random(f"vpmoe-core/{seed}/{label}/order").shuffle(order)
    return order[:max_per_task]


def fewshot_indices(n_items: int, idx: int, k: int, label: str, seed: int) -> list[int]:
    if k == 0:
        return []
    pool = [i for i in range(n_items) if i != idx]
    if k > len(pool):
        raise ValueError(f"task {label}: {k} few-shot examples requested but only {len(pool)} other items")
    return random.Random(f"vpmoe-core/{seed}/{label}/{idx}").sample(pool, k)


def choose(scores: list[Scored]) -> int:
    """Index of the option with the highest mean log-prob per token (first on ties)."""
    means = [s.mean_logprob for s in scores]
    return max(range(len(means)), key=lambda i: (means[i], -i))


def centered(acc: float, baseline_percent: float | None) -> float | None:
    if baseline_percent is None:
        return None
    b = baseline_percent / 100.0
    return (acc - b) / (1.0 - b)


def evaluate_task(model, tokenizer, spec: TaskSpec, items: list[dict], seed: int,
                  max_per_task: int | None, batch_tokens: int = 8192, details: bool = False) -> dict:
    """Accuracy (and centered accuracy) of one task; per-item records when `details`."""
    indices = select_indices(len(items), spec.label, seed, max_per_task)
    requests, spans = [], []
    for idx in indices:
        shots = [items[j] for j in fewshot_indices(len(items), idx, spec.num_fewshot, spec.label, seed)]
        reqs = item_requests(spec, items[idx], shots)
        spans.append((idx, len(requests), len(requests) + len(reqs)))
        requests.extend(reqs)
    scores = score_requests(model, tokenizer, requests, batch_tokens=batch_tokens)
    correct, records = 0, []
    for idx, lo, hi in spans:
        item_scores = scores[lo:hi]
        if spec.task_type == "language_modeling":
            ok = item_scores[0].is_greedy
            record = {"idx": idx, "correct": ok, "logprob": item_scores[0].logprob,
                      "n_tokens": item_scores[0].n_tokens, "n_greedy": item_scores[0].n_greedy}
        else:
            pred = choose(item_scores)
            ok = pred == items[idx]["gold"]
            record = {"idx": idx, "gold": items[idx]["gold"], "pred": pred, "correct": ok,
                      "logprobs": [s.logprob for s in item_scores], "n_tokens": [s.n_tokens for s in item_scores]}
        correct += int(ok)
        records.append(record)
    acc = correct / len(indices)
    result = {"type": spec.task_type, "num_fewshot": spec.num_fewshot, "delimiter": spec.delimiter,
              "n_items": len(items), "n_evaluated": len(indices), "n_correct": correct,
              "accuracy": acc, "random_baseline": spec.random_baseline,
              "centered": centered(acc, spec.random_baseline), "n_requests": len(requests)}
    if spec.random_baseline is None:
        result["note"] = "no random baseline in eval_meta_data.csv: centered accuracy not computed"
    if details:
        result["items"] = records
    return result


def suite_mean(task_results: dict[str, dict]) -> float | None:
    values = [r["centered"] for r in task_results.values() if r.get("centered") is not None]
    return sum(values) / len(values) if values else None


def run_core(model, tokenizer, bundle: Path, tasks: list[str] | None = None, seed: int = 0,
             max_per_task: int | None = None, batch_tokens: int = 8192, details: bool = False,
             progress=None) -> dict:
    """Evaluate `tasks` (default CORE-8; ["all"]: every task in core.yaml) from `bundle`.

    Tasks the bundle lacks, or whose type this harness does not know, are listed under `missing`
    with the reason; they never stop the run.
    """
    specs = read_task_specs(bundle)
    wanted = list(CORE8) if not tasks else (list(specs) if tasks == ["all"] else list(tasks))
    results, missing, files = {}, {}, {"core.yaml": sha256_file(bundle / "core.yaml"),
                                        "eval_meta_data.csv": sha256_file(bundle / "eval_meta_data.csv")}
    for label in wanted:
        spec = specs.get(label)
        if spec is None:
            missing[label] = "not listed in core.yaml"
            continue
        if spec.task_type not in TASK_TYPES:
            missing[label] = f"unsupported icl_task_type {spec.task_type!r} (supported: {', '.join(TASK_TYPES)})"
            continue
        path = bundle / "eval_data" / spec.dataset_uri
        if not path.is_file():
            missing[label] = f"data file eval_data/{spec.dataset_uri} not in the bundle"
            continue
        if progress:
            progress(f"core: {label} ({spec.task_type}, {spec.num_fewshot}-shot)")
        items = read_task_items(bundle, spec)
        files[f"eval_data/{spec.dataset_uri}"] = sha256_file(path)
        results[label] = evaluate_task(model, tokenizer, spec, items, seed, max_per_task, batch_tokens, details)
    mean = suite_mean(results)
    return {"tasks": results, "missing": missing, "n_tasks_run": len(results), "n_tasks_wanted": len(wanted),
            "mean_centered": mean, "complete": not missing,
            "mean_note": (None if not missing else
                          f"mean over {len(results)} of {len(wanted)} tasks; missing: {', '.join(missing)}"),
            "bundle_files_sha256": files}

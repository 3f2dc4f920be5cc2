"""The eval report: one JSON with every metric, a flat summary, deltas, a reference row, and a PNG.

Design choices:
- Deterministic: the JSON holds nothing that changes between two identical runs except the single
  field `timestamps` (start/finish times and wall-clock seconds). Keys are sorted when written.
- `summary` flattens the headline numbers into dotted keys (`core8.arc_easy.accuracy`,
  `ppl.final.nll`, ...). `--baseline OLD.json` is compared on these keys: `deltas[key]` holds old,
  new and new - old, and keys present in only one report are listed, never silently dropped. The
  settings that change what a metric measures (`RESULT_OPTIONS`: suites, tasks, items per task,
  seed, ...) are compared too: any that differ are listed (`options_differ`) and printed with the
  deltas, which then compare two different evaluations.
- The reference row carries Arcee Trinity Nano Base's published numbers (accuracy, percent) for the
  tasks CORE-8 shares with them, next to ours. Their shot counts and metric variants (acc vs
  acc_norm) are not CORE's, so the gap is a direction, not a like-for-like difference.
- The PNG (matplotlib, Agg backend) is a 2x2 summary: CORE task accuracy with the reference, span
  NLL, Harmony validity and failure reasons, router entropy per layer (or numeric copy by kind).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vpmoe.cli import UserError

SCHEMA = "vpmoe-eval-report/1"
REFERENCE = {
    "model": "Arcee Trinity Nano Base (6B total, ~1B active, 10T tokens)",
    "source": "model card / its transcription (docs/training_plan.md, success metrics)",
    "accuracy_pct": {"arc_challenge": 84.0, "hellaswag": 77.4, "winogrande": 72.8, "piqa": 82.2, "boolq": 84.3},
    "not_in_core8_pct": {"mmlu_5shot": 67.7, "gsm8k": 58.4},
    "note": "their shot settings and metric variants (e.g. acc_norm) may differ from CORE's; compare direction, not points",
}


def summarize(suites: dict) -> dict:
    """Flat {dotted key: number} of the headline metrics of every suite that ran."""
    out = {}

    def put(key, value):
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value

    core = suites.get("core8") or {}
    if core.get("tasks"):
        put("core8.mean_centered", core.get("mean_centered"))
        put("core8.n_tasks_run", core.get("n_tasks_run"))
        for label, r in core["tasks"].items():
            put(f"core8.{label}.accuracy", r.get("accuracy"))
            put(f"core8.{label}.centered", r.get("centered"))
    ppl = suites.get("ppl") or {}
    for span, r in (ppl.get("spans") or {}).items():
        put(f"ppl.{span}.nll", r.get("nll"))
        put(f"ppl.{span}.ppl", r.get("ppl"))
    fmt = suites.get("format") or {}
    if fmt.get("applicable"):
        put("format.valid_rate", fmt.get("valid_rate"))
        put("format.analysis_tokens_mean", (fmt.get("analysis_tokens") or {}).get("mean"))
        put("format.final_tokens_mean", (fmt.get("final_tokens") or {}).get("mean"))
    num = suites.get("numeric") or {}
    if num.get("copy"):  # (a skipped suite has only its reason)
        put("numeric.copy_exact_rate", num["copy"].get("exact_rate"))
        put("numeric.copy_token_accuracy", num["copy"].get("token_accuracy"))
        put("numeric.tokens_total", num["tokenization"].get("total_tokens"))
    router = suites.get("router") or {}
    if router.get("applicable"):
        put("router.mean_entropy_norm", router.get("mean_entropy_norm"))
        put("router.min_entropy_norm", router.get("min_entropy_norm"))
        put("router.dead_experts_total", router.get("dead_experts_total"))
        put("router.max_over_mean_worst", router.get("max_over_mean_worst"))
    return out


def reference_rows(suites: dict) -> dict:
    tasks = ((suites.get("core8") or {}).get("tasks")) or {}
    rows = {}
    for label, ref in REFERENCE["accuracy_pct"].items():
        ours = tasks.get(label, {}).get("accuracy")
        rows[label] = {"reference_pct": ref, "ours_pct": None if ours is None else 100.0 * ours,
                       "gap_pct": None if ours is None else 100.0 * ours - ref}
    return {**REFERENCE, "rows": rows}


def read_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: baseline report not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: baseline is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("summary"), dict):
        raise UserError(f"{path}: not a vpmoe eval report (expected schema {SCHEMA!r} with a 'summary' table)")
    return data


# report config keys that change what the metrics measure (not where inputs live or how fast)
RESULT_OPTIONS = ("suite", "tasks", "max_per_task", "seed", "dtype", "format_n", "format_max_new_tokens",
                  "numeric_n", "ppl_max_rows")


def options_differ(old: dict, new: dict) -> dict:
    """{key: [old, new]} for the `RESULT_OPTIONS` two report configs set differently."""
    return {k: [old.get(k), new.get(k)] for k in RESULT_OPTIONS if old.get(k) != new.get(k)}


def deltas(new_summary: dict, baseline: dict, baseline_path: str, new_config: dict | None = None) -> dict:
    old = baseline["summary"]
    shared = sorted(set(old) & set(new_summary))
    return {"path": str(baseline_path),
            "model_weights_sha256": (baseline.get("model") or {}).get("weights_sha256"),
            "options_differ": options_differ(baseline.get("config") or {}, new_config or {}),
            "deltas": {k: {"old": old[k], "new": new_summary[k], "delta": new_summary[k] - old[k]} for k in shared},
            "only_in_baseline": sorted(set(old) - set(new_summary)),
            "only_in_new": sorted(set(new_summary) - set(old))}


def build_report(model_info: dict, config: dict, data: dict, suites: dict, timestamps: dict,
                 versions: dict, baseline_path: str | None = None, png: str | None = None) -> dict:
    summary = summarize(suites)
    report = {"schema": SCHEMA, "model": model_info, "config": config, "data": data, "suites": suites,
              "summary": summary, "reference": reference_rows(suites), "versions": versions,
              "png": png, "timestamps": timestamps}
    if baseline_path:
        report["baseline"] = deltas(summary, read_report(baseline_path), baseline_path, config)
    return report


def write_report(report: dict, path: str | Path) -> None:
    """Written to a temporary name, then renamed: a report that exists is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# PNG


def _not_run(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_summary(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = report["suites"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    # (a) CORE accuracy with random baseline and the reference
    ax = axes[0][0]
    tasks = ((suites.get("core8") or {}).get("tasks")) or {}
    if tasks:
        labels = list(tasks)
        xs = range(len(labels))
        ax.bar(xs, [100 * tasks[l]["accuracy"] for l in labels], color="tab:blue", label="accuracy")
        ax.scatter(xs, [tasks[l]["random_baseline"] if tasks[l]["random_baseline"] is not None else float("nan")
                        for l in labels], color="gray", marker="_", s=400, label="random")
        ref = REFERENCE["accuracy_pct"]
        ax.scatter(xs, [ref.get(l, float("nan")) for l in labels], color="tab:red", marker="*", s=80,
                   label="Trinity Nano Base")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        mean = suites["core8"].get("mean_centered")
        ax.set_title(f"CORE accuracy (%)  mean centered = {mean:.3f}" if mean is not None else "CORE accuracy (%)")
        ax.legend(fontsize=7)
    else:
        _not_run(ax, "CORE", (suites.get("core8") or {}).get("skipped", "not run"))
    # (b) span NLL
    ax = axes[0][1]
    spans = ((suites.get("ppl") or {}).get("spans")) or {}
    if spans:
        names = list(spans)
        ax.bar(names, [spans[s]["nll"] if spans[s]["nll"] is not None else 0.0 for s in names], color="tab:green")
        ax.set_title("held-out NLL per span (nats/token)")
    else:
        _not_run(ax, "held-out NLL", (suites.get("ppl") or {}).get("skipped", "not run"))
    # (c) Harmony validity
    ax = axes[1][0]
    fmt = suites.get("format") or {}
    if fmt.get("applicable"):
        names = ["valid"] + list(fmt["failures"])
        values = [fmt["n_valid"]] + list(fmt["failures"].values())
        ax.bar(names, values, color=["tab:green"] + ["tab:orange"] * len(fmt["failures"]))
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"Harmony format: {100 * (fmt['valid_rate'] or 0):.1f}% valid of {fmt['n_prompts']}")
    else:
        _not_run(ax, "Harmony format", fmt.get("reason") or fmt.get("skipped", "not run"))
    # (d) router entropy per layer, else numeric copy per kind
    ax = axes[1][1]
    router = suites.get("router") or {}
    numeric = suites.get("numeric") or {}
    if router.get("applicable"):
        ent = [l["entropy_norm"] or 0.0 for l in router["layers"]]
        dead = [len(l["dead_experts"]) for l in router["layers"]]
        ax.plot(range(len(ent)), ent, marker="o", label="entropy / ln E")
        ax.set_ylim(0, 1.05)
        ax2 = ax.twinx()
        ax2.bar(range(len(dead)), dead, alpha=0.3, color="tab:red", label="dead experts")
        ax.set_title(f"router: mean entropy {router['mean_entropy_norm']:.3f}, dead {router['dead_experts_total']}")
        ax.set_xlabel("MoE layer")
    elif numeric.get("copy"):
        kinds = list(numeric["copy"]["by_kind"])
        ax.bar(kinds, [numeric["copy"]["by_kind"][k]["exact_rate"] or 0.0 for k in kinds], color="tab:purple")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"numeric copy exact rate: {numeric['copy']['exact_rate']:.2f}")
    else:
        _not_run(ax, "router / numeric", router.get("reason") or "not run")
    model = report["model"]
    fig.suptitle(f"vpmoe eval: {Path(model['path']).name} ({model['class']}, {model['n_params']:,} params)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)

"""CORE-8: the DCLM CORE subset nanochat reports, read from the eval bundle and scored like DCLM / nanochat.

The bundle (DCLM / nanochat layout; the official `eval_bundle.zip` unpacks to `eval_bundle/`):
    core.yaml               icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                         continuation_delimiter}, ...]
    eval_meta_data.csv      one row per task: "Eval Task" (= label), "Random baseline" (percent)
    eval_data/<dataset_uri> one JSON object per line

Design choices:
- The bundle is read from a local folder: `--bundle`, else $VPMOE_EVAL_BUNDLE, else the folder
  `vpmoe eval fetch-bundle` writes (~/.cache/vpmoe/eval_bundle). With none, the error says how to
  get one; nothing is downloaded implicitly. `fetch_bundle` downloads the zip nanochat uses, checks
  its sha256 before unpacking (a mismatch leaves nothing behind), refuses members that would
  escape the target folder, and moves the folder into place only when complete.
- A task is described entirely by its core.yaml entry, so tasks this code has never seen run as
  long as their type is multiple_choice, schema or language_modeling. A task whose file is missing
  (or whose type is unknown) is reported missing, not crashed on; a malformed line is an error
  naming file and line. Every file read is hashed into the report.
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

import csv
import json
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from vpmoe.cli import UserError
from vpmoe.utils import file_sha256
from vpmoe.eval.harness import Request, Scored, score_requests

# the bundle nanochat's scripts/base_eval.py downloads; sha256 pinned by independent public copies
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
BUNDLE_ENV = "VPMOE_EVAL_BUNDLE"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# the fields each item type must carry
ITEM_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
               "schema": ("context_options", "continuation", "gold"),
               "language_modeling": ("context", "continuation")}


def default_bundle_dir() -> Path:
    root = os.environ.get("VPMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vpmoe")
    return Path(root) / "eval_bundle"


HOW_TO_GET = (f"run `vpmoe eval fetch-bundle` (downloads {BUNDLE_URL}, checks sha256 {BUNDLE_SHA256[:12]}..., "
              f"unpacks to {default_bundle_dir()}), or pass --bundle DIR / set {BUNDLE_ENV} to a folder "
              "holding core.yaml, eval_meta_data.csv and eval_data/")


def resolve_bundle_dir(explicit: str | None) -> Path:
    """The bundle folder to use, or UserError saying how to get one."""
    if explicit:
        candidates = [("--bundle", Path(explicit))]
    elif os.environ.get(BUNDLE_ENV):
        candidates = [(f"${BUNDLE_ENV}", Path(os.environ[BUNDLE_ENV]))]
    else:
        candidates = [("default", default_bundle_dir())]
    source, path = candidates[0]
    if not path.is_dir():
        raise UserError(f"no CORE eval bundle at {path} ({source}); {HOW_TO_GET}")
    if not (path / "core.yaml").is_file():
        nested = path / "eval_bundle"  # the zip's own top folder
        if (nested / "core.yaml").is_file():
            return nested
        raise UserError(f"{path}: not a CORE eval bundle (no core.yaml); {HOW_TO_GET}")
    return path


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float | None  # percent, from eval_meta_data.csv


def read_baselines(bundle: Path) -> dict[str, float]:
    path = bundle / "eval_meta_data.csv"
    if not path.is_file():
        raise UserError(f"{path}: missing (the bundle's random baselines); {HOW_TO_GET}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for column in ("Eval Task", "Random baseline"):
            if column not in (reader.fieldnames or []):
                raise UserError(f"{path}: no '{column}' column (have {reader.fieldnames})")
        out = {}
        for lineno, row in enumerate(reader, 2):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise UserError(f"{path}:{lineno}: Random baseline {row['Random baseline']!r} is not a number") from None
    return out


def read_task_specs(bundle: Path) -> dict[str, TaskSpec]:
    """label -> TaskSpec for every entry of core.yaml (any label, any of the three types)."""
    import yaml  # PyYAML, a dependency of transformers

    path = bundle / "core.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: expected a top-level 'icl_tasks' list")
    baselines = read_baselines(bundle)
    specs = {}
    for i, entry in enumerate(tasks):
        where = f"{path}: icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping")
        for key in ("label", "dataset_uri", "icl_task_type"):
            if key not in entry:
                raise UserError(f"{where}: missing '{key}'")
        shots = entry.get("num_fewshot", [0])
        shots = shots if isinstance(shots, list) else [shots]
        if not shots or not all(isinstance(s, int) and s >= 0 for s in shots):
            raise UserError(f"{where} ({entry['label']}): num_fewshot must be a list of integers >= 0, got {shots!r}")
        label = str(entry["label"])
        specs[label] = TaskSpec(label=label, dataset_uri=str(entry["dataset_uri"]),
                                task_type=str(entry["icl_task_type"]), num_fewshot=shots[0],
                                delimiter=str(entry.get("continuation_delimiter", " ")),
                                random_baseline=baselines.get(label))
    return specs


def validate_item(item, spec: TaskSpec, where: str) -> dict:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key in ITEM_FIELDS[spec.task_type]:
        if key not in item:
            raise UserError(f"{where}: {spec.task_type} item has no '{key}' field")
    options = item.get("choices") if spec.task_type == "multiple_choice" else item.get("context_options")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: needs a list of at least two strings as options")
        gold = item["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise UserError(f"{where}: gold {gold!r} is not an index into its {len(options)} options")
    return item


def read_task_items(bundle: Path, spec: TaskSpec) -> list[dict]:
    path = bundle / "eval_data" / spec.dataset_uri
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON: {e}") from None
            items.append(validate_item(item, spec, f"{path}:{lineno}"))
    if not items:
        raise UserError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------------------------
# fetching the bundle


def download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download {url}: {reason} (no network? download it elsewhere and run "
                        "`vpmoe eval fetch-bundle --zip PATH`)") from None


def safe_extract(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        root = into.resolve()
        for member in zf.namelist():
            dest = (into / member).resolve()
            if dest != root and root not in dest.parents:
                raise UserError(f"{archive}: member {member!r} would unpack outside the bundle folder; refusing")
        zf.extractall(into)


def install_bundle_zip(archive: Path, out_dir: Path, sha256: str | None = BUNDLE_SHA256) -> Path:
    """Check `archive` against `sha256` (None skips the check), unpack it, move its bundle folder to
    `out_dir`. Returns `out_dir`. Nothing is left at `out_dir` unless every step succeeds."""
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"{archive}: no such zip file")
    digest = file_sha256(archive)
    if sha256 is not None and digest != sha256:
        raise UserError(f"{archive}: sha256 {digest} does not match the expected {sha256}; "
                        "refusing to unpack (corrupt download or a different bundle)")
    if out_dir.exists():
        raise UserError(f"{out_dir}: already exists; remove it or pick another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".bundle-") as tmp:
        try:
            safe_extract(archive, Path(tmp))
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad directory, or corrupt compressed data
            raise UserError(f"{archive}: not a valid zip ({e})") from None
        found = sorted(p.parent for p in Path(tmp).rglob("core.yaml"))
        if not found:
            raise UserError(f"{archive}: contains no core.yaml; not a CORE eval bundle")
        source = found[0]
        for required in ("eval_meta_data.csv", "eval_data"):
            if not (source / required).exists():
                raise UserError(f"{archive}: bundle folder has no {required}")
        shutil.move(str(source), str(out_dir))
    return out_dir


def fetch_bundle(out_dir: str | None = None, url: str = BUNDLE_URL, sha256: str | None = BUNDLE_SHA256,
                 zip_path: str | None = None) -> Path:
    """Download (or take `zip_path`), verify and unpack the bundle; returns the bundle folder."""
    target = Path(out_dir) if out_dir else default_bundle_dir()
    if zip_path:
        return install_bundle_zip(Path(zip_path), target, sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        download(url, archive)
        return install_bundle_zip(archive, target, sha256)


# ----------------------------------------------------------------------------------------------
# scoring

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


def plan_tasks(bundle: Path, tasks: list[str] | None) -> tuple[dict, list[str], dict[str, str]]:
    """(specs, wanted labels, {label: why it cannot run}) for `tasks` (None: the CORE-8; ["all"]:
    every task in core.yaml)."""
    specs = read_task_specs(bundle)
    wanted = list(CORE8) if not tasks else (list(specs) if tasks == ["all"] else list(tasks))
    missing = {}
    for label in wanted:
        spec = specs.get(label)
        if spec is None:
            missing[label] = "not listed in core.yaml"
        elif spec.task_type not in TASK_TYPES:
            missing[label] = f"unsupported icl_task_type {spec.task_type!r} (supported: {', '.join(TASK_TYPES)})"
        elif not (bundle / "eval_data" / spec.dataset_uri).is_file():
            missing[label] = f"data file eval_data/{spec.dataset_uri} not in the bundle"
    return specs, wanted, missing


def check_named_tasks(bundle: Path, tasks: list[str] | None, require_one: bool) -> None:
    """Before any model loads: tasks named with --tasks must all be runnable (a typo or a missing
    file is an error); the default CORE-8 and "all" may run partially (the report lists what is
    missing), but with `require_one` (--suite core8 named) not with none at all."""
    specs, wanted, missing = plan_tasks(bundle, tasks)
    named = bool(tasks) and tasks != ["all"]
    if missing and (named or (require_one and len(missing) == len(wanted))):
        raise UserError(f"{'--tasks' if named else '--suite core8'}: "
                        f"{'; '.join(f'{k}: {v}' for k, v in missing.items())} ({bundle}; tasks in its "
                        f"core.yaml: {', '.join(specs)})")


def run_core(model, tokenizer, bundle: Path, tasks: list[str] | None = None, seed: int = 0,
             max_per_task: int | None = None, batch_tokens: int = 8192, details: bool = False,
             progress=None) -> dict:
    """Evaluate `tasks` (default CORE-8; ["all"]: every task in core.yaml) from `bundle`.

    Tasks the bundle lacks, or whose type this harness does not know, are listed under `missing`
    with the reason; they never stop the run.
    """
    specs, wanted, missing = plan_tasks(bundle, tasks)
    results, files = {}, {"core.yaml": file_sha256(bundle / "core.yaml"),
                          "eval_meta_data.csv": file_sha256(bundle / "eval_meta_data.csv")}
    for label in wanted:
        if label in missing:
            continue
        spec = specs[label]
        path = bundle / "eval_data" / spec.dataset_uri
        if progress:
            progress(f"core: {label} ({spec.task_type}, {spec.num_fewshot}-shot)")
        items = read_task_items(bundle, spec)
        files[f"eval_data/{spec.dataset_uri}"] = file_sha256(path)
        results[label] = evaluate_task(model, tokenizer, spec, items, seed, max_per_task, batch_tokens, details)
    mean = suite_mean(results)
    return {"tasks": results, "missing": missing, "n_tasks_run": len(results), "n_tasks_wanted": len(wanted),
            "mean_centered": mean, "complete": not missing,
            "mean_note": (None if not missing else
                          f"mean over {len(results)} of {len(wanted)} tasks; missing: {', '.join(missing)}"),
            "bundle_files_sha256": files}

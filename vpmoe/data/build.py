"""`vpmoe data build`: SYNTH rows -> truncated, split, packed shards + manifest, resumable.

Design choices:
- Work is cut into input chunks (`sources.Chunk`); each worker process renders, truncates, splits
  and packs one chunk and writes that chunk's shards itself (`train-00007.*`, `valid-00007.*`), then
  a completion marker `chunks/00007.json` holding the chunk's counts and file hashes. All writes
  are temp-name + rename, the marker last, so after a crash a chunk is either complete (marker)
  or redone. A re-run reuses complete chunks and gives byte-identical output; `manifest.json` is
  assembled from the markers at the end.
- Packing is best-fit decreasing within a chunk (tens of thousands of documents are plenty for
  >95% fill); documents are never split across rows. Rows keep document boundaries (one Megatron
  sequence per document) so attention never crosses documents.
- Split: a hash of the row id (sources.SPLIT_RULE), independent of order, chunking and workers.
- A malformed row is skipped and counted by reason (render.SKIP_REASONS); `strict=True` turns the
  first one into a DataError naming the file, row and field. The build never crashes on data.
- `build.json` pins config hash and input identity; a re-run into the same directory with other
  settings or changed input is refused instead of mixing two datasets.
"""
from __future__ import annotations

import io
import json
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vpmoe import tokenizer as tok
from vpmoe.config import ConfigError, config_hash, from_dict, to_dict
from vpmoe.data import DataError
from vpmoe.data.prompt import load_prompt, prompt_from_dict
from vpmoe.data.render import SKIP_REASONS, SPAN_NAMES, RowSkipped, check_row, make_document, make_renderer
from vpmoe.data.shards import FORMAT, write_atomic, write_shard
from vpmoe.data.sources import SPLIT_RULE, Chunk, open_source, read_parquet_chunk, split_of
from vpmoe.utils import git_sha

SPLITS = ("train", "valid")
TRUNCATIONS = ("analysis", "analysis+user")


@dataclass
class BuildConfig:
    """Everything that decides the bytes of the output (workers/renderer/strict do not)."""

    seq_len: int
    valid_fraction: float = 0.01
    chunk_rows: int = 65536
    prompt: dict[str, Any] = field(default_factory=lambda: load_prompt().to_dict())

    def validate(self) -> None:
        if self.seq_len < 64:
            raise ConfigError(f"seq_len: must be >= 64, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction: must be in [0, 1), got {self.valid_fraction}")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows: must be >= 1, got {self.chunk_rows}")
        prompt_from_dict(self.prompt, "prompt")

    def hash(self) -> str:
        return config_hash({"format": FORMAT, "tokenizer_sha256": tok.TOKENIZER_SHA256,
                            "split_rule": SPLIT_RULE, **to_dict(self)})


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each document (longest first) goes to the open row with the least room
    that still fits it. Returns rows as lists of document indices; deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    smallest = min(lengths, default=0)
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # sorted (room left, row number)
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"document of {need} tokens exceeds row capacity {capacity}")
        j = bisect_left(open_rows, (need, -1))
        if j < len(open_rows):
            room, r = open_rows.pop(j)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        room -= need
        if room >= smallest:  # rows with less room than any document are closed for good
            insort(open_rows, (room, r))
    return rows


# --- one chunk (runs in a worker process) ---

_worker: dict = {}


def _init_worker(settings: dict) -> None:
    """Per-process renderer; with fork the parent's is inherited and reused."""
    key = json.dumps({k: settings[k] for k in ("prompt", "renderer", "check_every")}, sort_keys=True)
    if _worker.get("key") != key:
        prompt = prompt_from_dict(settings["prompt"])
        _worker.update(key=key, renderer=make_renderer(prompt, settings["renderer"], settings["check_every"]))
    _worker["settings"] = settings


def _rows_sidecar(ids: list[str], source_rows: list[int], truncated: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"row_id": pa.array(ids, pa.string()), "source_row": pa.array(source_rows, pa.int64()),
                      "truncated": pa.array(truncated, pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def process_chunk(chunk: Chunk) -> dict:
    """Render, truncate, split, pack and write one chunk; returns (and writes) its marker."""
    s = _worker["settings"]
    render = _worker["renderer"].render
    out, seq_len = Path(s["out"]), s["seq_len"]
    rows = chunk.rows if chunk.rows is not None else read_parquet_chunk(chunk)
    skipped = {reason: 0 for reason in SKIP_REASONS}
    examples: dict[str, str] = {}
    truncated = {t: 0 for t in TRUNCATIONS}
    kept = {split: [] for split in SPLITS}  # (document, row id, source row)
    id_field = rows["_id_field"]
    for i, values in enumerate(zip(rows["id"], rows["query"], rows["synthetic_reasoning"],
                                   rows["synthetic_answer"])):
        source_row = chunk.first_row + i
        try:
            row_id, query, reasoning, answer = check_row(*values, id_field=id_field)
            doc = make_document(render(query, reasoning, answer), seq_len)
        except RowSkipped as e:
            if s["strict"]:
                raise DataError(f"{chunk.label}: row {source_row}: {e}") from None
            skipped[e.reason] += 1
            examples.setdefault(e.reason, f"{chunk.label}: row {source_row}: {e}")
            continue
        if doc.truncated:
            truncated[doc.truncated] += 1
        kept[split_of(row_id, s["valid_fraction"])].append((doc, row_id, source_row))
    marker = {"chunk": chunk.index, "config_hash": s["config_hash"], "source": chunk.label,
              "first_row": chunk.first_row, "rows_in": chunk.n_rows, "skipped": skipped,
              "skip_examples": examples, "truncated": truncated, "shards": {}}
    for split, items in kept.items():
        if items:
            marker["shards"][split] = _write_split(out, f"{split}-{chunk.index:05d}", items, seq_len)
    marker_path = out / "chunks" / f"{chunk.index:05d}.json"
    write_atomic(marker_path, [json.dumps(marker, indent=1, sort_keys=True).encode()])
    return marker


def _write_split(out: Path, name: str, items: list, seq_len: int) -> dict:
    rows = pack_best_fit([len(doc.tokens) for doc, _, _ in items], seq_len)
    order = [i for row in rows for i in row]
    docs = [items[i][0] for i in order]
    lengths = np.array([len(d.tokens) for d in docs], dtype=np.int32)
    document_indices = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    arrays = {f: np.concatenate([getattr(d, f) for d in docs]) for f in ("tokens", "loss_mask", "span_id")}
    files = write_shard(out, name, arrays, lengths, document_indices)
    sidecar = _rows_sidecar([items[i][1] for i in order], [items[i][2] for i in order],
                            [items[i][0].truncated for i in order])
    files["rows.parquet"] = write_atomic(out / f"{name}.rows.parquet", [sidecar])
    return {"name": name, "rows": len(rows), "docs": len(docs), "tokens": int(lengths.sum()),
            "supervised": {span: int(np.count_nonzero(arrays["span_id"] == sid)) for sid, span in SPAN_NAMES.items()},
            "files": files}


# --- the whole build (main process) ---

def _marker_complete(out: Path, marker: dict, cfg_hash: str) -> bool:
    if marker.get("config_hash") != cfg_hash:
        return False
    for shard in marker.get("shards", {}).values():
        for suffix, info in shard["files"].items():
            path = out / f"{shard['name']}.{suffix}"
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                return False
    return True


def _load_markers(out: Path, cfg_hash: str) -> dict[int, dict]:
    markers = {}
    for path in sorted((out / "chunks").glob("*.json")):
        try:
            marker = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # unreadable marker: the chunk is simply redone
        if _marker_complete(out, marker, cfg_hash):
            markers[int(marker["chunk"])] = marker
    return markers


def _claim(out: Path, cfg: BuildConfig, described: dict) -> None:
    """Pin this directory to one config + input; remove temp files left by a killed build."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunks").mkdir(exist_ok=True)
    pin = {"format": FORMAT, "config": to_dict(cfg), "config_hash": cfg.hash(), "input": described}
    pin_path = out / "build.json"
    if pin_path.exists():
        previous = json.loads(pin_path.read_text())
        if previous.get("config_hash") != pin["config_hash"]:
            raise DataError(f"{out}: holds a build with another config (hash {previous.get('config_hash')}); "
                            "use a new --out directory")
        if previous.get("input") != described:
            raise DataError(f"{out}: holds a build of different input (files or hashes changed); "
                            "use a new --out directory")
    else:
        write_atomic(pin_path, [json.dumps(pin, indent=1, sort_keys=True).encode()])
    for stale in [*out.glob(".*.tmp-*"), *(out / "chunks").glob(".*.tmp-*")]:
        stale.unlink()


def _run_chunks(chunks, workers: int, settings: dict):
    """Yield markers of processed chunks; at most 2 chunks per worker in flight (bounded memory).

    A process pool from `concurrent.futures`, not `multiprocessing.Pool`: when a chunk fails (a
    `--strict` error) or the caller stops early, the pool is shut down by letting the workers finish
    the chunks they hold and cancelling the rest. `Pool`'s exit terminates its workers instead, which
    once left its task thread waiting forever on a queue's inter-process lock (a worker killed while
    holding it, by the stack): a build that hung after its error (the test suite, 2026-12-07). A
    worker that dies (Ctrl-C reaches the whole process group) breaks the pool, which fails the
    outstanding chunks rather than waiting for them."""
    _init_worker(settings)
    if workers <= 1:
        for chunk in chunks:
            yield process_chunk(chunk)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                               initargs=(settings,))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(process_chunk, chunk)))
            while len(pending) >= 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(chunk, future):
    """The chunk's marker; a pool broken by a dead worker as a `DataError` that says what to do."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise DataError(f"{chunk.label}: a build worker process died before chunk {chunk.index} (rows from "
                        f"{chunk.first_row}) was finished: killed, or out of memory (fewer --workers or a "
                        "smaller --chunk-rows use less). Rerun the same command: chunks already written are "
                        "kept") from None


def duplicate_row_ids(out: Path, markers: list[dict], limit: int = 5) -> tuple[int, list[str]]:
    """(extra copies of repeated row ids, up to `limit` descriptions naming file and rows).

    Chunks are built independently (in parallel), so repeats are found afterwards from the shards'
    row sidecars: a hash count over all ids (pyarrow, in C++), then the few repeated ids located."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = [(m["source"], pq.read_table(out / f"{shard['name']}.rows.parquet", columns=["row_id", "source_row"]))
              for m in markers for shard in m["shards"].values()]
    if not tables:
        return 0, []
    counts = pc.value_counts(pa.chunked_array([t["row_id"] for _, t in tables]))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    extra = int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
    if not extra:
        return 0, []
    shown = repeated.field("values")[:limit]
    where: dict[str, list[str]] = {v: [] for v in shown.to_pylist()}
    for label, t in tables:
        hit = t.filter(pc.is_in(t["row_id"], value_set=shown))
        for row_id, source_row in zip(hit["row_id"].to_pylist(), hit["source_row"].to_pylist()):
            where[row_id].append(f"{label}: row {source_row}")
    return extra, [f"field row_id: {v!r} repeats at " + ", ".join(sorted(w)) for v, w in where.items()]


def assemble_manifest(cfg: BuildConfig, described: dict, markers: list[dict]) -> dict:
    counts = {"rows_in": 0, "rows_kept": 0, "rows_skipped": {r: 0 for r in SKIP_REASONS},
              "rows_truncated": {t: 0 for t in TRUNCATIONS}, "skip_examples": {}, "splits": {}}
    shards = {split: [] for split in SPLITS}
    for marker in markers:
        counts["rows_in"] += marker["rows_in"]
        for reason, n in marker["skipped"].items():
            counts["rows_skipped"][reason] += n
        for reason, text in marker["skip_examples"].items():
            counts["skip_examples"].setdefault(reason, text)
        for kind, n in marker["truncated"].items():
            counts["rows_truncated"][kind] += n
        for split in SPLITS:
            if split in marker["shards"]:
                shards[split].append(marker["shards"][split])
    for split in SPLITS:
        entries = shards[split]
        tokens, rows = sum(e["tokens"] for e in entries), sum(e["rows"] for e in entries)
        counts["splits"][split] = {
            "docs": sum(e["docs"] for e in entries), "rows": rows, "tokens": tokens,
            "supervised_tokens": {k: sum(e["supervised"][k] for e in entries) for k in SPAN_NAMES.values()},
            "packing_efficiency": tokens / (rows * cfg.seq_len) if rows else 0.0}
        counts["rows_kept"] += counts["splits"][split]["docs"]
    return {"format": FORMAT, "git_sha": git_sha(), "config": to_dict(cfg), "config_hash": cfg.hash(),
            "seq_len": cfg.seq_len,
            "tokenizer": {"name": "o200k_harmony", "sha256": tok.TOKENIZER_SHA256, "vocab_size": tok.VOCAB_SIZE,
                          "eod_id": tok.EOD_ID},
            "input": described, "split_rule": SPLIT_RULE, "counts": counts, "shards": shards}


def build(input_spec, out: str | Path, seq_len: int, prompt_path: str | Path | None = None,
          valid_fraction: float = 0.01, workers: int = 1, strict: bool = False, chunk_rows: int = 65536,
          renderer: str = "fast", check_every: int = 256, progress: bool = True, source=None) -> dict:
    """Build (or resume) a packed dataset in `out`; returns the manifest. `source` may be a ready
    source object (e.g. sources.DatasetsSource over an in-memory dataset) instead of `input_spec`."""
    from vpmoe.data.progress import Progress

    prompt = load_prompt(prompt_path)
    cfg = from_dict(BuildConfig, {"seq_len": seq_len, "valid_fraction": valid_fraction,
                                  "chunk_rows": chunk_rows, "prompt": prompt.to_dict()})
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    source = source if source is not None else open_source(str(input_spec))
    described = source.describe()
    out = Path(out)
    _claim(out, cfg, described)
    cfg_hash = cfg.hash()
    markers = _load_markers(out, cfg_hash)
    settings = {"prompt": cfg.prompt, "renderer": renderer, "check_every": check_every, "out": str(out),
                "seq_len": seq_len, "valid_fraction": valid_fraction, "strict": strict, "config_hash": cfg_hash}
    total = source.total_rows
    done_rows = sum(m["rows_in"] for m in markers.values())
    with Progress(None if total is None else total - done_rows, "rows", f"build {out.name}", progress) as bar:
        for marker in _run_chunks(source.chunks(chunk_rows, skip=set(markers)), workers, settings):
            markers[marker["chunk"]] = marker
            bar.advance(marker["rows_in"], tokens=sum(s["tokens"] for s in marker["shards"].values()))
    n_chunks = source.n_chunks
    missing = [i for i in range(n_chunks) if i not in markers]
    if missing:
        raise DataError(f"{out}: chunks {missing[:5]} produced no marker (build incomplete)")
    ordered = [markers[i] for i in range(n_chunks)]
    extra, examples = duplicate_row_ids(out, ordered)
    if extra and strict:  # no manifest is written, so the output is not a usable dataset
        raise DataError(f"{described.get('path', input_spec)}: {extra} repeated row ids; "
                        + "; ".join(examples[:3]) + ". Remove the repeats, or build without --strict "
                        "(they are then kept and counted in the manifest)")
    manifest = assemble_manifest(cfg, described, ordered)
    counts = manifest["counts"]
    if not counts["rows_kept"]:  # no manifest: an empty dataset would only fail later, in training
        reasons = {r: n for r, n in counts["rows_skipped"].items() if n}
        raise DataError(f"{described.get('path', input_spec)}: no usable row in {counts['rows_in']} "
                        + (f"(skipped: {reasons}; first: {next(iter(counts['skip_examples'].values()), '')})"
                           if reasons else "(the input is empty)"))
    manifest["counts"]["duplicate_row_ids"] = extra
    manifest["counts"]["duplicate_examples"] = examples
    write_atomic(out / "manifest.json", [json.dumps(manifest, indent=1, sort_keys=True).encode()])
    return manifest

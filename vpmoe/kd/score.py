"""`vpmoe teacher score`: one teacher forward over every packed row, supervised positions cached.

Design choices:
- Input is a dataset built by `vpmoe data build` (DIR/manifest.json + shards); one split is scored
  (default train). Cache shards are one-to-one with the split's data shards, in manifest order, so
  `sample_index` (the row's index in its split) finds its cache row by cumulative row counts.
- Each packed row is cut at its document boundaries and every document is scored on its own
  (the student never attends across documents either). Supervised positions are those with
  loss_mask = 1 (label-aligned: position t predicts token t + 1 of the same document).
- Identity: the cache manifest records the teacher id and config, temperature, codec spec, the
  tokenizer sha256 and `data_split_hash` (sha256 over the split's shard names, row counts and
  file hashes, so it changes iff the scored tokens/masks could differ). Re-running into an
  existing cache with any other identity is refused. The teacher's identity (`teacher_identity`)
  is its id, backend and dtype, and for the hf backend a fingerprint of its weights (config.json
  and sampled blocks of every weight file: a different checkpoint under the same name is caught,
  a moved one is not refused), for vllm the served model name; output-neutral settings (batch
  sizes, device, concurrency) may change between runs. It is computed before the manifest is
  written, so a wrong teacher path leaves nothing behind.
- Resume and work split: a shard is the unit. Finished shards (record present, sizes right) are
  skipped; with `--rank/--world` (or torchrun's RANK/WORLD_SIZE) each process scores the shards
  with index % world == rank. Every rank writes the same manifest (atomic, identical bytes).
- Progress: rich bar over supervised positions (tokens/s, ETA), counting only this run's work.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vpmoe.kd import KDError
from vpmoe.kd.cache import (MANIFEST, CacheError, CacheSpec, ShardWriter, check_hashes, new_manifest,
                            read_json, shard_complete, write_json)
from vpmoe.kd.teacher import TeacherConfig, make_teacher

ROWS_PER_CALL_TOKENS = 65536  # rows are handed to the backend in groups of about this many tokens
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 16  # sampled per weight file: 16 blocks of 64 KiB


def weights_fingerprint(path) -> str:
    """sha256 over an HF model folder's config.json and, per weight file (name order), its name,
    size and 16 evenly spaced 64 KiB blocks: cheap at any model size (~1 MiB read per file), and
    two different checkpoints of one architecture differ in the sampled bytes."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise CacheError(f"{root}: teacher.path has no config.json (a Hugging Face model folder is expected)")
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise CacheError(f"{root}: teacher.path has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(FINGERPRINT_BLOCKS):
                fh.seek(max(0, size - FINGERPRINT_BLOCK) * i // max(1, FINGERPRINT_BLOCKS - 1))
                h.update(fh.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


def teacher_identity(cfg: TeacherConfig) -> dict:
    """What two runs writing into one cache must share (module docstring)."""
    ident = {"id": cfg.teacher_id, "backend": cfg.backend, "dtype": cfg.dtype}
    if cfg.backend == "hf":
        ident["weights_fingerprint"] = weights_fingerprint(cfg.path)
    else:
        ident["model"] = cfg.model
    return ident


def data_manifest(data_dir) -> dict:
    """The dataset's manifest (checked by the data loader's reader: format and tokenizer)."""
    from vpmoe.data import DataError
    from vpmoe.data.loader import read_manifest

    try:
        manifest, sha = read_manifest(data_dir)
    except DataError as e:
        raise CacheError(str(e)) from None
    manifest["_sha256"] = sha
    return manifest


def data_split_hash(manifest: dict, split: str) -> str:
    """Fingerprint of one split's shards: names, rows and the sha256 of their data files."""
    shards = manifest.get("shards", {}).get(split)
    if shards is None:
        raise CacheError(f"data manifest has no split {split!r} (splits: {sorted(manifest.get('shards', {}))})")
    items = [[s["name"], s["rows"], {k: v["sha256"] for k, v in sorted(s["files"].items()) if k.endswith(".bin")}]
             for s in shards]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def tokenizer_sha(manifest: dict) -> str:
    return manifest.get("tokenizer", {}).get("sha256", "unknown")


def row_documents(arrays: dict, doc_lengths, where: str):
    """Split a packed row into (tokens, supervised positions) per document with any supervision."""
    tokens = np.asarray(arrays["tokens"], dtype=np.int64)
    mask = np.asarray(arrays["loss_mask"]) > 0
    docs, start = [], 0
    for length in np.asarray(doc_lengths, dtype=np.int64):
        seg = slice(start, start + int(length))
        positions = np.flatnonzero(mask[seg])
        if positions.size and positions[-1] == length - 1:
            raise CacheError(f"{where}: supervised position {start + int(positions[-1])} is the last token of "
                             "its document (nothing to predict): the data's loss_mask is not label-aligned")
        docs.append((tokens[seg], positions))
        start += int(length)
    return tokens, docs


def _progress(total: int, enabled: bool, description: str):
    from vpmoe.data.progress import Progress  # the data job's rich bar: done/total, tokens/s, ETA

    return Progress(total, "positions", description, enabled)


def score(data_dir, teacher_cfg: TeacherConfig, out, spec: CacheSpec, split: str = "train",
          rank: int | None = None, world: int | None = None, progress: bool = True, teacher=None,
          seed: int = 0) -> dict:
    """Score (or resume) this rank's shards of `split`; returns a summary dict."""
    from vpmoe.data.shards import Shard

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise CacheError(f"rank {rank} outside world size {world}")
    data_dir, out = Path(data_dir), Path(out)
    manifest_in = data_manifest(data_dir)
    shards = manifest_in["shards"].get(split, [])
    vocab = manifest_in.get("tokenizer", {}).get("vocab_size", spec.vocab_size)
    if vocab != spec.vocab_size:
        raise CacheError(f"{data_dir}: data vocab {vocab} != cache vocab_size {spec.vocab_size}")
    teacher_meta = {"id": teacher_cfg.teacher_id, "backend": teacher_cfg.backend, "dtype": teacher_cfg.dtype,
                    "config": asdict(teacher_cfg), "identity": teacher_identity(teacher_cfg)}
    manifest = new_manifest(spec, teacher_meta, teacher_cfg.temperature, tokenizer_sha(manifest_in),
                            data_split_hash(manifest_in, split), [(s["name"], s["rows"]) for s in shards])
    manifest["split"] = split
    manifest["data_manifest_sha256"] = manifest_in["_sha256"]  # informational; the split hash is checked
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        old = read_json(out / MANIFEST, "teacher cache manifest")
        check_hashes(old, out, manifest["tokenizer_sha256"], manifest["data_manifest_hash"])
        manifest["data_manifest_sha256"] = old.get("data_manifest_sha256")
        for key in ("spec", "temperature", "shards", "split"):
            if old.get(key) != manifest[key]:
                raise CacheError(f"{out}: existing cache has another {key} ({old.get(key)!r} vs {manifest[key]!r}); "
                                 "use a new --out directory")
        # caches written before the identity was recorded are checked by the teacher id alone
        was = old["teacher"].get("identity", {"id": old["teacher"]["id"]})
        differ = {k: (v, teacher_meta["identity"].get(k)) for k, v in was.items() if teacher_meta["identity"].get(k) != v}
        if differ:
            raise CacheError(f"{out}: existing cache was scored by another teacher ("
                             + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
                             + "); score into a new --out directory")
        manifest["teacher"] = old["teacher"]  # keep the first run's record byte-identical
    write_json(out / MANIFEST, manifest)
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    for entry in mine:  # temp files of a killed run of this rank's shards (no other rank owns them)
        for stale in out.glob(f".{entry['name']}.*tmp*"):
            stale.unlink(missing_ok=True)
    todo = [s for s in mine if not shard_complete(out, s["name"])]
    summary = {"rank": rank, "world": world, "shards_total": len(shards), "shards_mine": len(mine),
               "shards_skipped": len(mine) - len(todo), "positions": 0, "bytes": 0}
    if not todo:
        return summary
    if teacher is None:
        teacher = make_teacher(teacher_cfg, spec.top_k, spec.tail_samples, seed=seed + rank)
    total = sum(s["supervised"]["reasoning"] + s["supervised"]["final"] for s in todo)
    with _progress(total, progress, f"teacher score rank {rank}") as bar:
        for entry in todo:
            meta = _score_shard(data_dir, entry, out, spec, teacher, bar, Shard)
            summary["positions"] += meta["positions"]
            summary["bytes"] += meta["bytes"]
    return summary


def _score_shard(data_dir: Path, entry: dict, out: Path, spec: CacheSpec, teacher, bar, shard_cls) -> dict:
    shard = shard_cls(data_dir, entry["name"])
    if len(shard) != entry["rows"]:
        raise CacheError(f"{data_dir}/{entry['name']}: {len(shard)} rows, the data manifest says {entry['rows']}")
    writer = ShardWriter(out, entry["name"], spec)
    try:
        r = 0
        while r < len(shard):
            group, tokens_in_group = [], 0
            while r < len(shard) and (not group or tokens_in_group < ROWS_PER_CALL_TOKENS):
                arrays, doc_lengths = shard.row(r)
                tokens, docs = row_documents(arrays, doc_lengths, f"{data_dir}/{entry['name']} row {r}")
                group.append((tokens, docs))
                tokens_in_group += len(tokens)
                r += 1
            flat = [d for _, docs in group for d in docs if len(d[1])]
            try:
                scores = iter(teacher.score_docs(flat) if flat else [])
            except KDError as e:  # which request: the shard and its rows
                raise CacheError(f"{data_dir}/{entry['name']} rows {r - len(group)}..{r - 1} "
                                 f"({len(flat)} documents): {e}") from None
            for tokens, docs in group:
                per_doc = [next(scores) for d in docs if len(d[1])]
                k = spec.known
                cat = lambda f, shape: (np.concatenate([getattr(s, f) for s in per_doc])  # noqa: E731
                                        if per_doc else np.zeros(shape, np.float32))
                ids, lps = cat("ids", (0, k)).astype(np.int64), cat("logprobs", (0, k))
                writer.add_row(tokens, ids, lps, cat("label_logprob", (0,)), cat("rest_logmass", (0,)))
            n_positions = sum(len(p) for _, docs in group for _, p in docs)
            bar.advance(n_positions, tokens=n_positions)
        return writer.finish({"data_shard": entry["name"]})
    except BaseException:
        writer.abort()
        raise

"""`vpmoe data verify DIR`: prove a built dataset is exactly what its manifest says.

Design choices:
- Checks go from cheap to expensive and stop at the first bad file, naming it: presence and byte
  size, sha256, index headers and exact sizes (shards.read_index), aligned boundaries across the
  tokens/loss_mask/span_id arrays, row/doc/token counts against the manifest, then the content
  invariants the loader relies on (ids in the vocab, masks 0/1, span ids 0-2, mask == span>0,
  every document ends in EOD with its last label unsupervised, rows no longer than seq_len).
- It raises DataError; the CLI turns that into exit status 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vpmoe import tokenizer as tok
from vpmoe.data import DataError
from vpmoe.data.loader import MANIFEST, read_manifest
from vpmoe.data.shards import Shard
from vpmoe.utils import file_sha256


def _check_content(shard: Shard, seq_len: int) -> None:
    tokens, mask, span = (shard.arrays[f] for f in ("tokens", "loss_mask", "span_id"))
    where = shard.path("tokens.bin")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= tok.VOCAB_SIZE):
        raise DataError(f"{where}: token id outside [0, {tok.VOCAB_SIZE})")
    if len(span) and int(span.max()) > 2:
        raise DataError(f"{shard.path('span_id.bin')}: span id above 2")
    if not np.array_equal(mask, (span > 0).astype(np.uint8)):
        raise DataError(f"{shard.path('loss_mask.bin')}: loss mask disagrees with span ids")
    doc_ends = np.cumsum(shard.sequence_lengths, dtype=np.int64) - 1
    if len(doc_ends) and (np.any(tokens[doc_ends] != tok.EOD_ID) or np.any(mask[doc_ends] != 0)
                          or np.any(mask[doc_ends - 1] != 0)):
        raise DataError(f"{where}: a document does not end with an unsupervised EOD")
    if len(shard) and int(np.max(np.diff(shard.row_offsets))) > seq_len:
        raise DataError(f"{where}: a row is longer than seq_len {seq_len}")


def verify(directory: str | Path, progress: bool = False) -> dict:
    """Check every shard file of a built dataset; returns totals, raises DataError on the first fault."""
    from vpmoe.data.progress import Progress

    directory = Path(directory)
    manifest, manifest_sha = read_manifest(directory)
    seq_len = int(manifest["seq_len"])
    n_files = n_bytes = 0
    n_shards = sum(len(entries) for entries in manifest["shards"].values())
    with Progress(n_shards, "shards", f"verify {directory.name}", progress) as bar:
        for split, entries in manifest["shards"].items():
            _verify_split(directory, manifest, split, entries, seq_len, bar)
            n_files += sum(len(e["files"]) for e in entries)
            n_bytes += sum(info["bytes"] for e in entries for info in e["files"].values())
    return {"manifest_sha256": manifest_sha, "files": n_files, "bytes": n_bytes,
            "splits": {s: manifest["counts"]["splits"][s] for s in manifest["shards"]}}


def _verify_split(directory: Path, manifest: dict, split: str, entries: list, seq_len: int, bar) -> None:
    import pyarrow.parquet as pq

    docs = rows = tokens = 0
    for entry in entries:
        for suffix, info in entry["files"].items():
            path = directory / f"{entry['name']}.{suffix}"
            if not path.is_file():
                raise DataError(f"{path}: missing")
            if path.stat().st_size != info["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, manifest says {info['bytes']}")
            if file_sha256(path) != info["sha256"]:
                raise DataError(f"{path}: sha256 does not match the manifest")
        shard = Shard(directory, entry["name"])
        if (len(shard), len(shard.sequence_lengths), int(shard.row_offsets[-1])) != \
                (entry["rows"], entry["docs"], entry["tokens"]):
            raise DataError(f"{shard.path('tokens.idx')}: rows/docs/tokens "
                            f"{len(shard)}/{len(shard.sequence_lengths)}/{int(shard.row_offsets[-1])} "
                            f"differ from the manifest {entry['rows']}/{entry['docs']}/{entry['tokens']}")
        _check_content(shard, seq_len)
        sidecar = directory / f"{entry['name']}.rows.parquet"
        if pq.ParquetFile(sidecar).metadata.num_rows != entry["docs"]:
            raise DataError(f"{sidecar}: row ids do not match the shard's {entry['docs']} documents")
        docs, rows, tokens = docs + entry["docs"], rows + entry["rows"], tokens + entry["tokens"]
        bar.advance(1, tokens=entry["tokens"])
    expected = manifest["counts"]["splits"][split]
    if (docs, rows, tokens) != (expected["docs"], expected["rows"], expected["tokens"]):
        raise DataError(f"{directory / MANIFEST}: split {split} counts disagree with its shards")

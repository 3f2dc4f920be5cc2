"""Packed shards in the Megatron-Core IndexedDataset `.bin`/`.idx` layout: writer and reader.

Layout of one `.idx` (little-endian), as Megatron-Core's `indexed_dataset.py` reads it:
    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 sequence count S | u64 document count D
    | int32 sequence_lengths[S] | int64 sequence_pointers[S] (byte offsets into .bin)
    | int64 document_indices[D] (sequence index where each document starts, plus a final S)
The `.bin` is the sequences' elements back to back.

Design choices:
- A Megatron *sequence* is one of our documents (a conversation ending in EOD) and a Megatron
  *document* is one packed training row (the sequences packed together, at most seq_len tokens).
  So existing tooling reads the files, and document boundaries (for attention masking and position
  restarts) are the sequence boundaries. Padding is not stored; the loader pads rows to seq_len.
- One shard = three arrays with identical lengths and indices: tokens (int32, code 4), loss_mask
  (uint8, code 1), span_id (uint8, code 1), files `NAME.tokens.bin/.idx`, `NAME.loss_mask.*`,
  `NAME.span_id.*`.
- Every file is written to a temporary name, fsynced and renamed; readers check headers, exact
  sizes and pointer consistency up front, so a truncated or corrupt shard is refused at open with
  the file named, instead of yielding garbage mid-training.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpmoe.data import DataError

FORMAT = "vpmoe-packed-shards/1"  # manifest format written by build, read by loader/verify
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
               np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
FIELDS = {"tokens": np.dtype(np.int32), "loss_mask": np.dtype(np.uint8), "span_id": np.dtype(np.uint8)}
SUFFIXES = [f"{field}.{ext}" for field in FIELDS for ext in ("bin", "idx")]


def index_bytes(dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> bytes:
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths):
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    header = INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype]) \
        + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


def write_atomic(path: Path, chunks) -> dict:
    """Write byte chunks to `path` via a temporary name; returns {"bytes", "sha256"}."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                f.write(view)
                digest.update(view)
                size += len(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_shard(directory: Path, name: str, arrays: dict[str, np.ndarray], sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> dict[str, dict]:
    """Write the three arrays of one shard; returns {suffix: {"bytes", "sha256"}} for the manifest."""
    total = int(np.sum(sequence_lengths, dtype=np.int64))
    files = {}
    for field, dtype in FIELDS.items():
        data = np.ascontiguousarray(arrays[field], dtype=dtype)
        if len(data) != total:
            raise ValueError(f"{name}.{field}: {len(data)} elements, sequence lengths sum to {total}")
        files[f"{field}.bin"] = write_atomic(directory / f"{name}.{field}.bin", [data])
        files[f"{field}.idx"] = write_atomic(directory / f"{name}.{field}.idx",
                                             [index_bytes(dtype, sequence_lengths, document_indices)])
    return files


@dataclass
class Index:
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S]
    document_indices: np.ndarray  # int64 [D]


def read_index(path: Path, expected_dtype: np.dtype | None = None) -> Index:
    """Parse and check one `.idx`; any inconsistency raises DataError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read index: {e}") from None
    if len(raw) < HEADER_BYTES or raw[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DataError(f"{path}: not a Megatron IndexedDataset index (bad magic or truncated header)")
    offset = len(INDEX_MAGIC)
    (version,) = struct.unpack_from("<Q", raw, offset)
    (code,) = struct.unpack_from("<B", raw, offset + 8)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, offset + 9)
    if version != INDEX_VERSION:
        raise DataError(f"{path}: index version {version}, expected {INDEX_VERSION}")
    if code not in CODE_DTYPES:
        raise DataError(f"{path}: unknown dtype code {code}")
    dtype = CODE_DTYPES[code]
    if expected_dtype is not None and dtype != expected_dtype:
        raise DataError(f"{path}: dtype {dtype} (code {code}), expected {expected_dtype}")
    expected_size = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) != expected_size:
        raise DataError(f"{path}: {len(raw)} bytes, header promises {expected_size} "
                        f"({n_seq} sequences, {n_doc} document indices): truncated or corrupt")
    lengths = np.frombuffer(raw, np.int32, n_seq, HEADER_BYTES)
    pointers = np.frombuffer(raw, np.int64, n_seq, HEADER_BYTES + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, HEADER_BYTES + 12 * n_seq)
    if n_seq and (lengths.min() <= 0 or pointers[0] != 0
                  or not np.array_equal(np.diff(pointers), lengths[:-1].astype(np.int64) * dtype.itemsize)):
        raise DataError(f"{path}: sequence lengths and pointers are inconsistent (corrupt index)")
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) <= 0):
        raise DataError(f"{path}: document indices must rise strictly from 0 to {n_seq} (corrupt index)")
    return Index(dtype, lengths, pointers, docs)


class Shard:
    """Memory-mapped reader of one shard (three aligned IndexedDatasets).

    Row r (a Megatron document) holds sequences `document_indices[r]:document_indices[r+1]`;
    `row_offsets[r]:row_offsets[r+1]` are its elements in each `.bin`.
    """

    def __init__(self, directory: str | Path, name: str, seq_len: int | None = None):
        self.directory, self.name = Path(directory), name
        indices = {field: read_index(self.path(f"{field}.idx"), dtype) for field, dtype in FIELDS.items()}
        ref = indices["tokens"]
        for field, index in indices.items():
            if not (np.array_equal(index.sequence_lengths, ref.sequence_lengths)
                    and np.array_equal(index.document_indices, ref.document_indices)):
                raise DataError(f"{self.path(f'{field}.idx')}: boundaries differ from "
                                f"{self.path('tokens.idx').name} (misaligned shard)")
        self.sequence_lengths = ref.sequence_lengths
        self.document_indices = ref.document_indices
        element_offsets = np.zeros(len(ref.sequence_lengths) + 1, dtype=np.int64)
        np.cumsum(ref.sequence_lengths, out=element_offsets[1:])
        self.row_offsets = element_offsets[ref.document_indices]
        if seq_len is not None and len(self) and int(np.max(np.diff(self.row_offsets))) > seq_len:
            raise DataError(f"{self.path('tokens.idx')}: a row is longer than seq_len {seq_len}")
        self.arrays = {}
        for field, dtype in FIELDS.items():
            path = self.path(f"{field}.bin")
            size = path.stat().st_size if path.exists() else -1
            expected = int(element_offsets[-1]) * dtype.itemsize
            if size != expected:
                raise DataError(f"{path}: {size if size >= 0 else 'missing'} bytes, index promises "
                                f"{expected}: truncated or corrupt shard")
            self.arrays[field] = (np.memmap(path, dtype=dtype, mode="r") if expected
                                  else np.zeros(0, dtype=dtype))

    def path(self, suffix: str) -> Path:
        return self.directory / f"{self.name}.{suffix}"

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def row(self, r: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Row r's arrays (views) and its document lengths."""
        lo, hi = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
        lengths = self.sequence_lengths[self.document_indices[r]:self.document_indices[r + 1]]
        return {field: array[lo:hi] for field, array in self.arrays.items()}, lengths


"""Shared helpers for the data tests (no tests here): the SYNTH sample and an independent reader.

The real sample lives beside the project in ../shared/data/synth_sample (override with
VPMOE_SHARED_SAMPLE). If it is absent the tests FAIL saying so, unless VPMOE_NO_SHARED=1 is set,
which turns them into explicit skips.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

SAMPLE_DIR = Path(os.environ.get("VPMOE_SHARED_SAMPLE")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "synth_sample")


def sample_dir() -> Path:
    if (SAMPLE_DIR / "synth_train.parquet").is_file():
        return SAMPLE_DIR
    if os.environ.get("VPMOE_NO_SHARED") == "1":
        pytest.skip(f"VPMOE_NO_SHARED=1: shared SYNTH sample {SAMPLE_DIR} not used")
    pytest.fail(f"shared SYNTH sample not found at {SAMPLE_DIR} (expected beside the project as "
                "../shared/data/synth_sample); set VPMOE_NO_SHARED=1 to skip these tests explicitly")


def sample_rows() -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(sample_dir() / "synth_train.parquet").to_pylist()


def golden_rows() -> dict[str, dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(sample_dir() / "synth_train_harmony_tokens.parquet").to_pylist()
    return {r["row_id"]: r for r in rows}


def read_megatron(prefix: Path) -> dict:
    """Minimal, independent reader of the documented Megatron-Core IndexedDataset layout."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00", f"{prefix}.idx: bad magic"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    offset = 34
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=offset)
    offset += 8 * n_seq
    doc_index = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=offset)
    offset += 8 * n_doc
    assert offset == len(raw), f"{prefix}.idx: {len(raw) - offset} trailing bytes"
    dtype = {1: np.uint8, 4: np.int32}[code]
    data = np.fromfile(f"{prefix}.bin", dtype=dtype)
    sequences = [data[p // data.itemsize: p // data.itemsize + n] for p, n in zip(pointers, lengths)]
    return {"version": version, "code": code, "lengths": lengths, "doc_index": doc_index,
            "sequences": sequences, "data": data}

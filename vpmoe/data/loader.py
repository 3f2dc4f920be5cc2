"""Training batches from packed shards: memory-mapped, deterministic, rank-sharded, resumable.

Design choices:
- A split is the concatenation of its shards in manifest order; `sample_index` is a row's index in
  that order, so it is stable across runs and a teacher cache can be keyed by it.
- The sample stream is one infinite sequence of *global positions*; position p is sample
  `perm(seed, epoch)[p % N]` with epoch = p // N (a fresh permutation per epoch, or identity
  when not shuffling). Each step consumes world_size * batch_size positions and rank r takes its
  own contiguous batch_size of them. So every epoch visits every sample exactly once across all
  ranks, every rank always gets full batches (batches simply straddle epoch ends), and the whole
  loader state is one integer: `state_dict()` -> resume at exactly the next sample, even with a
  different world size.
- Shards are opened with structural checks (headers, exact sizes, aligned boundaries, manifest
  byte counts), so a corrupt or truncated file is refused at load, naming it;
  `verify_checksums=True` also re-hashes every file (what `vpmoe data verify` does).
- Rows are padded to seq_len here (padding is not stored): pad tokens are EOD, their loss mask 0,
  their labels -100, and they form their own trailing document in `doc_ids`.
"""
from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from vpmoe import tokenizer as tok
from vpmoe.data import DataError
from vpmoe.data.shards import FORMAT, Shard
from vpmoe.utils import file_sha256

MANIFEST = "manifest.json"
IGNORE_LABEL = -100


def read_manifest(directory: str | Path) -> tuple[dict, str]:
    """(manifest dict, sha256 of manifest.json bytes) for provenance; DataError if absent/invalid."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError:
        raise DataError(f"{path}: no manifest (not a built dataset, or the build did not finish)") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    if manifest["tokenizer"]["sha256"] != tok.TOKENIZER_SHA256:
        raise DataError(f"{path}: built with tokenizer {manifest['tokenizer']['sha256'][:12]}, this code "
                        f"uses {tok.TOKENIZER_SHA256[:12]}")
    return manifest, hashlib.sha256(raw).hexdigest()


class SplitData:
    """All rows of one split, memory-mapped; `sample(i)` returns row i padded to seq_len."""

    def __init__(self, directory: str | Path, split: str = "train", verify_checksums: bool = False):
        self.directory, self.split = Path(directory), split
        self.manifest, self.manifest_sha256 = read_manifest(directory)
        if split not in self.manifest["shards"]:
            raise DataError(f"{self.directory / MANIFEST}: no split {split!r}")
        self.seq_len = int(self.manifest["seq_len"])
        self.shards, counts = [], []
        for entry in self.manifest["shards"][split]:
            for suffix, info in entry["files"].items():
                path = self.directory / f"{entry['name']}.{suffix}"
                size = path.stat().st_size if path.exists() else None
                if size != info["bytes"]:
                    raise DataError(f"{path}: {'missing' if size is None else f'{size} bytes'}, manifest "
                                    f"says {info['bytes']}: truncated or replaced shard")
                if verify_checksums and file_sha256(path) != info["sha256"]:
                    raise DataError(f"{path}: sha256 does not match the manifest (corrupt shard)")
            shard = Shard(self.directory, entry["name"], self.seq_len)
            if len(shard) != entry["rows"]:
                raise DataError(f"{shard.path('tokens.idx')}: {len(shard)} rows, manifest says {entry['rows']}")
            self.shards.append(shard)
            counts.append(len(shard))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sample(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} rows of {self.split}")
        s = bisect_right(self.starts, index) - 1
        arrays, lengths = self.shards[s].row(index - int(self.starts[s]))
        n, T = len(arrays["tokens"]), self.seq_len
        tokens = np.full(T, tok.EOD_ID, dtype=np.int64)
        tokens[:n] = arrays["tokens"]
        labels = np.full(T, IGNORE_LABEL, dtype=np.int64)
        labels[:n - 1] = tokens[1:n]
        loss_mask = np.zeros(T, dtype=np.uint8)
        loss_mask[:n] = arrays["loss_mask"]
        span_id = np.zeros(T, dtype=np.int64)
        span_id[:n] = arrays["span_id"]
        doc_ids = np.full(T, len(lengths), dtype=np.int64)  # padding: its own document
        doc_ids[:n] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "span_id": span_id,
                "doc_ids": doc_ids}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        samples = [self.sample(int(i)) for i in indices]
        out = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
        out["sample_index"] = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return out


class DataLoader:
    """Infinite, deterministic batches of one split for one data-parallel rank."""

    def __init__(self, directory: str | Path, batch_size: int, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, verify_checksums: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.data = SplitData(directory, split, verify_checksums)
        if len(self.data) == 0:
            raise DataError(f"{Path(directory) / MANIFEST}: split {split!r} has no rows")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.split = shuffle, split
        self.position = 0  # global samples consumed by all ranks together
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.data)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> int:
        return self.position // len(self.data)

    def indices_at(self, position: int) -> list[int]:
        """Sample indices of this rank's batch for the step starting at global `position`."""
        n = len(self.data)
        start = position + self.rank * self.batch_size
        return [int(self._order(p // n)[p % n]) for p in range(start, start + self.batch_size)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.data.batch(self.indices_at(self.position))
        self.position += self.batch_size * self.world_size
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "split": self.split, "shuffle": self.shuffle,
                "manifest_sha256": self.data.manifest_sha256, "samples": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "split": self.split, "shuffle": self.shuffle,
                "manifest_sha256": self.data.manifest_sha256}
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"loader state was saved with {key}={state.get(key)!r}, this loader has "
                                f"{value!r}; refusing to resume on different data or order")
        self.position = int(state["position"])


def iter_eval_batches(directory: str | Path, batch_size: int, split: str = "valid", rank: int = 0,
                      world_size: int = 1, verify_checksums: bool = False):
    """One ordered pass (no shuffle) over a split for held-out eval: rank r gets samples r, r+W, ...;
    the last batch may be smaller. Yields the same batch dicts as DataLoader."""
    data = SplitData(directory, split, verify_checksums)
    mine = list(range(rank, len(data), world_size))
    for i in range(0, len(mine), batch_size):
        yield data.batch(mine[i:i + batch_size])

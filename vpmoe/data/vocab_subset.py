"""Vocabulary subsetting: train on the token ids the data actually uses (a CPU speed-up).

The o200k Harmony vocabulary has 201088 rows. On a CPU, a tiny model's step is dominated by the
[tokens, 201088] output head, so a demo or a smoke test would spend nearly all its time on rows no
token of its data ever touches. A `VocabSubset` is the sorted list of full-vocabulary ids a run
keeps: every id that occurs in the data plus every special token (ids >= 199998: Harmony's format
tokens and EOD must stay predictable). The model is built with `vocab_size = len(subset)`; ids are
mapped at the boundaries only:

- the training loader maps tokens and labels full -> compact (`to_compact`);
- generation maps prompts full -> compact and samples back compact -> full (`to_full`), so the
  tokenizer, the Harmony parser and the eval see ordinary o200k ids;
- a teacher cache scored by a model on the same subset is already compact; one scored in the
  full vocabulary is mapped with `to_compact(..., missing=-1)` and its out-of-subset mass is tail.

The subset is saved as JSON beside checkpoints and exports (`vocab_subset.json`) with a sha256, and
a run refuses data containing ids outside its subset (naming the first one). With no subset the
whole system runs the full 201088-row vocabulary; the tests exercise both.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FILENAME = "vocab_subset.json"
FIRST_SPECIAL = 199998  # o200k_harmony's special and reserved tokens start here


class VocabSubset:
    def __init__(self, ids, full_vocab_size: int = 201088):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0 or ids[0] < 0 or ids[-1] >= full_vocab_size:
            raise ValueError(f"vocab subset ids must lie in [0, {full_vocab_size}); got {ids[:1]}..{ids[-1:]}")
        self.ids = ids
        self.full_vocab_size = full_vocab_size
        lookup = np.full(full_vocab_size, -1, dtype=np.int64)
        lookup[ids] = np.arange(ids.size)
        self._lookup = torch.from_numpy(lookup)
        self._ids = torch.from_numpy(ids)

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ids.tobytes()).hexdigest()

    @classmethod
    def from_token_arrays(cls, arrays, full_vocab_size: int = 201088, pad_to: int = 64) -> "VocabSubset":
        """Ids used by `arrays` (iterables of int arrays) plus all special tokens, padded with the
        lowest unused ids to a multiple of `pad_to` rows (aligned matmuls)."""
        used = np.zeros(full_vocab_size, dtype=bool)
        for a in arrays:
            used[np.asarray(a, dtype=np.int64)] = True
        used[FIRST_SPECIAL:] = True
        extra = (-int(used.sum())) % pad_to
        if extra:
            used[np.flatnonzero(~used)[:extra]] = True
        return cls(np.flatnonzero(used), full_vocab_size)

    def to_compact(self, full: torch.Tensor, missing: int | None = None) -> torch.Tensor:
        """Map full ids to compact ids. Ids outside the subset raise, or become `missing` if given."""
        out = self._lookup.to(full.device)[full.clamp(0, self.full_vocab_size - 1)]
        out = torch.where(full < 0, full, out)  # negative labels (-100 ignore) pass through
        bad = (out < 0) & (full >= 0)
        if bad.any():
            if missing is None:
                first = int(full[bad].flatten()[0])
                raise ValueError(f"token id {first} is not in the vocab subset ({len(self)} ids, sha {self.sha256[:12]})")
            out = torch.where(bad, torch.full_like(out, missing), out)
        return out

    def to_full(self, compact: torch.Tensor) -> torch.Tensor:
        return self._ids.to(compact.device)[compact]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"full_vocab_size": self.full_vocab_size, "sha256": self.sha256,
                                   "ids": self.ids.tolist()}))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "VocabSubset":
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            data = json.loads(path.read_text())
            subset = cls(data["ids"], data["full_vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable vocab subset ({e})") from None
        if subset.sha256 != data.get("sha256"):
            raise ValueError(f"{path}: sha256 mismatch (file says {data.get('sha256')}, ids give {subset.sha256})")
        return subset

    @classmethod
    def find(cls, directory: str | Path) -> "VocabSubset | None":
        """The subset saved in a checkpoint/export directory, if there is one."""
        path = Path(directory) / FILENAME
        return cls.load(path) if path.exists() else None

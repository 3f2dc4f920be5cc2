"""The trainer's view of the data component: batch sources over `vpmoe data build` output.

Design choices:
- Training batches come from `vpmoe.data.loader.DataLoader`: deterministic, rank-sharded by
  global sample positions, its whole state one integer. A step's global batch is the same
  samples whatever the world size (rank r of W takes the r-th block of each W * B positions), so
  1-rank and N-rank runs over the same global batch see the same rows.
- Held-out batches: the first `eval_rows` rows of the valid split (all when 0), rank r taking rows
  r, r + W, ...; so the held-out loss is the same number whatever the world size, and evaluation
  never touches the training stream or its RNG.
- The manifest's sha256 and tokenizer sha go into checkpoint provenance; `data.seq_len` must
  equal the built sequence length (the shards are packed for it).
- Vocabulary subsets (`data.vocab_subset`, a CPU speed-up; vpmoe.data.vocab_subset): `auto` takes
  every id of the train and valid shards plus the special tokens, or a path names a saved subset.
  The trainer maps model inputs to compact ids; the loss maps labels (vpmoe.kd.objective).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vpmoe.config import ConfigError
from vpmoe.data.loader import DataLoader, SplitData, read_manifest
from vpmoe.data.vocab_subset import VocabSubset


def dataset_fingerprint(path: str | Path) -> dict:
    """{'manifest_sha', 'tokenizer_sha', 'seq_len'} of a built dataset (DataError if not one)."""
    manifest, sha = read_manifest(path)
    return {"manifest_sha": sha, "tokenizer_sha": manifest["tokenizer"]["sha256"],
            "seq_len": int(manifest["seq_len"])}


class BatchSource:
    """Training batches of one split for one rank: `next()`, `state_dict()`, `load_state_dict()`."""

    def __init__(self, data_cfg, split: str, rank: int, world: int):
        check_seq_len(data_cfg)
        self.loader = DataLoader(data_cfg.path, data_cfg.micro_batch_size, split=split,
                                 seed=data_cfg.shuffle_seed, rank=rank, world_size=world, shuffle=True)

    def next(self) -> dict:
        return next(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def check_seq_len(data_cfg) -> None:
    fp = dataset_fingerprint(data_cfg.path)
    if fp["seq_len"] != data_cfg.seq_len:
        raise ConfigError(f"data.seq_len={data_cfg.seq_len} but {data_cfg.path} was built with "
                          f"seq_len={fp['seq_len']}")


def eval_batches(data_cfg, split: str, rank: int, world: int, rows: int):
    """This rank's micro-batches of the first `rows` rows of `split` (all rows when 0: row i on rank
    i % world). Every rank yields as many as the busiest one, so each row is evaluated whatever the
    world size (a sharded forward needs every rank): a rank out of rows yields a zero-weight batch
    (row 0 with its loss mask cleared)."""
    data = SplitData(data_cfg.path, split)
    total = len(data) if rows == 0 else min(rows, len(data))
    mine, mb = list(range(rank, total, world)), data_cfg.micro_batch_size
    busiest = -(-total // world)  # rank 0's row count
    for i in range(0, busiest, mb):
        if i < len(mine):
            yield data.batch(mine[i:i + mb])
        else:
            batch = data.batch([0])
            batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
            yield batch


def resolve_vocab_subset(data_cfg) -> VocabSubset | None:
    """None (full vocabulary), the dataset's own ids (`auto`), or a saved subset file."""
    spec = data_cfg.vocab_subset
    if not spec:
        return None
    if spec == "auto":
        arrays = [shard.arrays["tokens"] for split in (data_cfg.train_split, data_cfg.valid_split)
                  for shard in SplitData(data_cfg.path, split).shards]
        return VocabSubset.from_token_arrays(arrays)
    try:
        return VocabSubset.load(spec)
    except ValueError as e:
        raise ConfigError(f"data.vocab_subset: {e}") from None

"""Loader: batch contract, exact resume, rank sharding, eval pass, refusal of damaged shards."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from tests.test_data_support import read_megatron, sample_dir
from tests.test_train_helpers import synth_data  # noqa: F401  (a fixture)
from vpmoe import tokenizer as tok
from vpmoe.data import DataError
from vpmoe.data.build import build
from vpmoe.data.loader import DataLoader, SplitData, iter_eval_batches, read_manifest

SEQ_LEN = 1024


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "ds"
    build(sample_dir() / "synth_train.parquet", out, seq_len=SEQ_LEN, valid_fraction=0.1, chunk_rows=300,
          progress=False)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contract_against_independent_reader(data_dir):
    loader = DataLoader(data_dir, batch_size=6, seed=3)
    batch = next(loader)
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "tokens": ((6, SEQ_LEN), torch.int64), "labels": ((6, SEQ_LEN), torch.int64),
        "loss_mask": ((6, SEQ_LEN), torch.uint8), "span_id": ((6, SEQ_LEN), torch.int64),
        "doc_ids": ((6, SEQ_LEN), torch.int64), "sample_index": ((6,), torch.int64)}
    manifest, _ = read_manifest(data_dir)
    shards = manifest["shards"]["train"]
    starts = np.cumsum([0] + [e["rows"] for e in shards])
    for b, index in enumerate(batch["sample_index"].tolist()):
        s = int(np.searchsorted(starts, index, side="right") - 1)
        prefix = data_dir / shards[s]["name"]
        ref = {f: read_megatron(f"{prefix}.{f}") for f in ("tokens", "loss_mask", "span_id")}
        lo, hi = ref["tokens"]["doc_index"][index - starts[s]:index - starts[s] + 2]
        row = {f: np.concatenate(ref[f]["sequences"][lo:hi]) for f in ref}
        lengths = ref["tokens"]["lengths"][lo:hi]
        n = len(row["tokens"])
        tokens, labels = batch["tokens"][b].numpy(), batch["labels"][b].numpy()
        assert np.array_equal(tokens[:n], row["tokens"]) and (tokens[n:] == tok.EOD_ID).all()
        assert np.array_equal(labels[:n - 1], row["tokens"][1:]) and (labels[n - 1:] == -100).all()
        assert np.array_equal(batch["loss_mask"][b].numpy()[:n], row["loss_mask"])
        assert np.array_equal(batch["span_id"][b].numpy()[:n], row["span_id"])
        assert batch["loss_mask"][b, n:].sum() == 0 and batch["span_id"][b, n:].sum() == 0
        doc_ids = batch["doc_ids"][b].numpy()
        assert np.array_equal(doc_ids[:n], np.repeat(np.arange(len(lengths)), lengths))
        assert (doc_ids[n:] == len(lengths)).all()
    supervised = batch["loss_mask"].bool()
    assert (batch["labels"][supervised] >= 0).all() and supervised.any()


def test_resume_gives_the_same_next_batches(data_dir):
    n = len(SplitData(data_dir))
    k, m, bsz = 5, 45, 8
    assert (k + m) * bsz * 2 > n  # the run crosses an epoch boundary
    straight = DataLoader(data_dir, batch_size=bsz, seed=7, rank=1, world_size=2)
    expected = [next(straight) for _ in range(k + m)][k:]
    first = DataLoader(data_dir, batch_size=bsz, seed=7, rank=1, world_size=2)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    fresh = DataLoader(data_dir, batch_size=bsz, seed=7, rank=1, world_size=2)
    fresh.load_state_dict(state)
    assert all(_same(next(fresh), e) for e in expected)
    other_seed = DataLoader(data_dir, batch_size=bsz, seed=8, rank=1, world_size=2)
    with pytest.raises(DataError, match="seed"):
        other_seed.load_state_dict(state)


def test_ranks_cover_each_epoch_exactly_once(data_dir):
    n = len(SplitData(data_dir))
    world, bsz = 3, 5
    loaders = [DataLoader(data_dir, batch_size=bsz, seed=11, rank=r, world_size=world) for r in range(world)]
    steps = -(-2 * n // (world * bsz))
    stream = []  # global position order: step, then rank, then batch slot
    for _ in range(steps):
        for loader in loaders:
            stream += next(loader)["sample_index"].tolist()
    epoch0, epoch1 = stream[:n], stream[n:2 * n]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)  # reshuffled per epoch
    again = DataLoader(data_dir, batch_size=bsz * world, seed=11)  # 1 rank, same global batch
    assert next(again)["sample_index"].tolist() == stream[:bsz * world]


def test_eval_pass_is_ordered_and_complete(data_dir):
    n = len(SplitData(data_dir, "valid"))
    assert n > 0
    seen = []
    for rank in range(2):
        batches = iter_eval_batches(data_dir, 3, rank=rank, world_size=2)
        ids = [i for b in batches for i in b["sample_index"].tolist()]
        assert ids == list(range(rank, n, 2))
        seen += ids
    assert sorted(seen) == list(range(n))


def test_read_manifest_returns_file_hash(data_dir):
    manifest, sha = read_manifest(data_dir)
    assert sha == hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest()
    assert manifest["seq_len"] == SEQ_LEN


@pytest.mark.parametrize("damage", ["truncate_bin", "idx_magic", "idx_lengths", "flip_bin"])
def test_damaged_shard_is_refused_naming_the_file(data_dir, tmp_path, damage):
    copy = tmp_path / "ds"
    shutil.copytree(data_dir, copy)
    name = read_manifest(copy)[0]["shards"]["train"][1]["name"]
    if damage == "truncate_bin":
        victim = copy / f"{name}.tokens.bin"
        victim.write_bytes(victim.read_bytes()[:-4])
    elif damage == "idx_magic":
        victim = copy / f"{name}.loss_mask.idx"
        victim.write_bytes(b"X" + victim.read_bytes()[1:])
    elif damage == "idx_lengths":  # same size, one sequence length moved to its neighbour
        victim = copy / f"{name}.span_id.idx"
        raw = bytearray(victim.read_bytes())
        lengths = np.frombuffer(raw, np.int32, 2, 34).copy()
        raw[34:42] = np.array([lengths[0] - 1, lengths[1] + 1], np.int32).tobytes()
        victim.write_bytes(bytes(raw))
    else:
        victim = copy / f"{name}.tokens.bin"
        raw = bytearray(victim.read_bytes())
        raw[100] ^= 0x10
        victim.write_bytes(bytes(raw))
    verify = damage == "flip_bin"  # a same-size flip inside data needs the checksum pass
    with pytest.raises(DataError) as e:
        DataLoader(copy, batch_size=2, verify_checksums=verify)
    assert str(victim) in str(e.value)


@pytest.mark.parametrize("rows", [0, 7])
def test_held_out_batches_cover_every_row_once_whatever_the_world_size(synth_data, rows):  # noqa: F811
    """`eval_batches`: over the ranks, the real rows are the first `rows` valid rows (all when 0),
    each once, and every rank yields as many micro-batches (a sharded forward needs them all),
    padding with zero-weight batches; so the held-out sums do not depend on the world size."""
    import dataclasses

    from vpmoe.train.config import DataSection
    from vpmoe.train.data import eval_batches

    total = len(SplitData(synth_data, "valid")) if rows == 0 else rows
    assert total >= 5
    for world in (1, 2, 3, 4):
        for mb in (1, 2, 3):
            cfg = dataclasses.replace(DataSection(), path=str(synth_data), micro_batch_size=mb)
            per_rank = [list(eval_batches(cfg, "valid", r, world, rows)) for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1, (world, mb)
            seen = [int(i) for bs in per_rank for b in bs if b["loss_mask"].any()
                    for i, m in zip(b["sample_index"], b["loss_mask"]) if m.any()]
            assert sorted(seen) == list(range(total)), (world, mb)
            padding = [b for bs in per_rank for b in bs if not b["loss_mask"].any()]
            assert all(b["tokens"].shape[0] == 1 for b in padding)

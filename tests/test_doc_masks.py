"""Flex block masks built from document runs (`flex.DocMasks`, `doc_block_tables`) against
FlexAttention's own `create_block_mask` evaluating the document mask over the whole [B, T, T]
grid, on the CPU: every table of the BlockMask equal, and the mask functions equal element by
element, for packed layouts (one document, many short ones, boundaries on and off the 128-token
blocks, one-token documents, a trailing padding document) and windows of 128 (the model's), 64,
129, 200, 255 and 256 (129 and 256: the first that reach a block two apart, or make a block
full, at a distance of one) and none."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from vpmoe.model import flex as FX

T = 1024


def packed(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """Doc ids 0, 1, ... for rows of consecutive documents of the given lengths (summing to T)."""
    rows = []
    for lengths in lengths_per_row:
        assert sum(lengths) == T
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def random_row(gen, n_docs: int) -> list[int]:
    cuts = sorted(torch.randperm(T - 1, generator=gen)[: n_docs - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [T])]


def layouts():
    gen = torch.Generator().manual_seed(11)
    yield "one document", packed([[T], [T]])
    yield "block edges", packed([[128, 256, 640], [384, 128, 128, 384]])
    yield "off the edges", packed([[100, 300, 1, 623], [129, 127, 1, 1, 766]])
    yield "one-token documents", packed([[1] * 64 + [T - 64], [T - 3, 1, 1, 1]])
    yield "padding document", packed([[700, 200, 124], [1000, 24]])
    for n in (2, 7, 40):
        yield f"random {n}", packed([random_row(gen, n), random_row(gen, n), random_row(gen, n)])


def doc_mod(doc, window):
    def mod(b, h, q_idx, kv_idx):
        ok = (doc[b, q_idx] == doc[b, kv_idx]) & (kv_idx <= q_idx)
        return ok & (q_idx - kv_idx < window) if window is not None else ok
    return mod


@pytest.mark.parametrize("window", [128, 64, 129, 200, 255, 256])
def test_doc_masks_equal_create_block_mask(window):
    from torch.nn.attention.flex_attention import BlockMask

    for name, doc in layouts():
        dm = FX.DocMasks(tuple(doc.shape), "cpu", window)
        local, glob = dm.update(doc)
        B = doc.shape[0]
        for got, win in ((local, window), (glob, None)):
            want = create_block_mask(doc_mod(doc, win), B, None, T, T, device="cpu")
            for attr in BlockMask._TENSOR_ATTRS:
                a, b = getattr(got, attr, None), getattr(want, attr, None)
                if isinstance(b, torch.Tensor) or isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), (name, win, attr)
            assert got.BLOCK_SIZE == want.BLOCK_SIZE and got.seq_lengths == want.seq_lengths
            # the mask inside partial blocks: the run-based function is the document mask
            assert torch.equal(create_mask(got.mask_mod, B, 1, T, T, device="cpu"),
                               create_mask(doc_mod(doc, win), B, 1, T, T, device="cpu")), (name, win)


def test_doc_masks_rebuild_in_place_and_fall_back():
    """static=True: a second layout's tables are copied into the first masks' tensors (what a
    captured graph reads); a length that is not a multiple of the block takes create_block_mask."""
    docs = [d for _, d in layouts()][:3]
    dm = FX.DocMasks(tuple(docs[0].shape), "cpu", 128, static=True)
    first_local, first_glob = dm.update(docs[0])
    before = first_glob.kv_num_blocks.clone()
    local, glob = dm.update(docs[2])
    assert local is first_local and glob is first_glob
    fresh = FX.DocMasks(tuple(docs[2].shape), "cpu", 128).update(docs[2])
    assert torch.equal(glob.kv_indices, fresh[1].kv_indices) and torch.equal(local.q_indices, fresh[0].q_indices)
    assert not torch.equal(before, glob.kv_num_blocks)
    odd = torch.zeros(2, 300, dtype=torch.long)
    odd[:, 170:] = 1
    got = FX.DocMasks((2, 300), "cpu", 128).update(odd)[1]
    want = create_block_mask(doc_mod(odd, None), 2, None, 300, 300, device="cpu")
    assert torch.equal(got.kv_indices, want.kv_indices) and torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)


def test_dense_switch_gives_the_same_tables(monkeypatch):
    """`TABLES_FROM_RUNS` off (the bench's A/B): create_block_mask over the run-based mask function,
    the same tables."""
    from torch.nn.attention.flex_attention import BlockMask

    doc = [d for _, d in layouts()][-1]
    runs = FX.DocMasks(tuple(doc.shape), "cpu", 128).update(doc)
    monkeypatch.setattr(FX, "TABLES_FROM_RUNS", False)
    dense = FX.DocMasks(tuple(doc.shape), "cpu", 128).update(doc)
    for a, b in zip(runs, dense):
        for attr in BlockMask._TENSOR_ATTRS:
            x, y = getattr(a, attr, None), getattr(b, attr, None)
            assert (x is None and y is None) or torch.equal(x, y), attr


def test_doc_runs_restart_on_a_returning_id():
    """A run is a document: an id that returns after another is a new run (as positions restart)."""
    doc = torch.tensor([[0, 0, 1, 1, 0, 0, 2]])
    assert FX.doc_runs(doc).tolist() == [[0, 0, 1, 1, 2, 2, 3]]

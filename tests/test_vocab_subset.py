"""Vocabulary subsetting against a direct dictionary mapping, and its file round trip."""
import numpy as np
import pytest
import torch

from vpmoe.data.vocab_subset import FIRST_SPECIAL, VocabSubset


def test_subset_keeps_data_ids_and_all_specials_and_maps_both_ways(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 5000, 300), rng.integers(100000, 100050, 40)]
    sub = VocabSubset.from_token_arrays(arrays, pad_to=64)
    assert len(sub) % 64 == 0
    used = set(np.concatenate(arrays).tolist()) | set(range(FIRST_SPECIAL, 201088))
    assert used <= set(sub.ids.tolist())
    full = torch.tensor(np.concatenate(arrays)[:50]).view(5, 10)
    compact = sub.to_compact(full)
    lookup = {int(f): i for i, f in enumerate(sub.ids)}  # independent mapping
    assert compact.tolist() == [[lookup[int(x)] for x in row] for row in full]
    assert torch.equal(sub.to_full(compact), full)
    assert sub.to_compact(torch.tensor([-100, 199999])).tolist() == [-100, lookup[199999]]
    missing = int(np.setdiff1d(np.arange(201088), sub.ids)[0])
    with pytest.raises(ValueError, match=f"token id {missing} is not in the vocab subset"):
        sub.to_compact(torch.tensor([missing]))
    assert sub.to_compact(torch.tensor([missing, 199999]), missing=-1).tolist() == [-1, lookup[199999]]
    sub.save(tmp_path)
    again = VocabSubset.load(tmp_path)
    assert again.sha256 == sub.sha256 and np.array_equal(again.ids, sub.ids)
    (tmp_path / "vocab_subset.json").write_text((tmp_path / "vocab_subset.json").read_text().replace('"ids": [0', '"ids": [1'))
    with pytest.raises(ValueError, match="sha256 mismatch|not a readable"):
        VocabSubset.load(tmp_path)

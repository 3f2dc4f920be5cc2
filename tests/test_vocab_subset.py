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


def test_generate_matches_full_forward_greedy_with_and_without_subset():
    from vpmoe.model.generate import generate
    from vpmoe.model.model import VpMoE
    from tests.test_model import randomize, small

    sub = VocabSubset(list(range(0, 40)) + list(range(199998, 200022)) , 201088)
    cfg = small(vocab_size=len(sub), window=4)
    model = randomize(VpMoE(cfg)).eval()
    prompts = [[1, 5, 7, 9, 11, 2], [3, 4]]
    outs = generate(model, prompts, max_new_tokens=6, stop_ids=(), subset=sub)
    for p, o in zip(prompts, outs):  # greedy by full forwards over compact ids, mapped back
        seq = sub.to_compact(torch.tensor([p]))
        for _ in range(6):
            with torch.no_grad():
                nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert o == sub.to_full(seq[0, len(p):]).tolist()
    # a stop token ends its row (kept), the other row runs on
    first = outs[0][0]
    stopped = generate(model, prompts, max_new_tokens=6, stop_ids=(first,), subset=sub)
    assert stopped[0] == [first] and len(stopped[1]) >= 1


def test_compact_sparse_target_folds_mass_outside_the_subset():
    from vpmoe.kd.losses import SparseTarget
    from vpmoe.kd.objective import compact_sparse_target

    sub = VocabSubset([2, 5, 9, 199999], 201088)
    ids = torch.tensor([[5, 7, 2], [8, 9, -1]])
    lps = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 0.0]]) + 1e-30)
    rest = torch.log(torch.tensor([0.2, 0.3]))
    out = compact_sparse_target(SparseTarget(ids, lps, rest), sub)
    pairs = [{(int(i), round(float(p), 4)) for i, p in zip(r_ids, r_lps.exp()) if i >= 0}
             for r_ids, r_lps in zip(out.ids, out.logprobs)]
    assert pairs == [{(1, 0.5), (0, 0.1)}, {(2, 0.4)}]  # compact ids keep their probabilities
    assert (out.ids[:, 0] >= 0).all()  # slot 0 stays a known id (row 2: 9 moved there)
    torch.testing.assert_close(out.rest_logmass.exp(), torch.tensor([0.4, 0.6]))  # + the dropped mass


def test_compact_sparse_target_position_with_no_known_id_in_the_subset_takes_its_label():
    """A position whose every cached id falls outside the subset: its label (in the subset) becomes
    its one known id with the teacher's label log-prob, and that mass leaves the rest bucket, so the
    teacher's distribution over (known ids, rest) still sums to 1; without labels: an actionable error."""
    from vpmoe.kd.losses import SparseTarget
    from vpmoe.kd.objective import compact_sparse_target

    sub = VocabSubset([2, 5, 9, 199999], 201088)
    ids = torch.tensor([[5, 7, 2], [8, 7, 3]])  # row 1: 8, 7 and 3 are all outside the subset
    lps = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.2, 0.1]]))
    rest = torch.log(torch.tensor([0.2, 0.4]))
    label_lp = torch.log(torch.tensor([0.5, 0.15]))  # row 1's label (9) holds 0.15 of the rest's 0.4
    target = SparseTarget(ids, lps, rest, label_lp)
    out = compact_sparse_target(target, sub, labels=torch.tensor([5, 9]))
    assert int(out.ids[1, 0]) == 2 and (out.ids[1, 1:] < 0).all()  # 9 is compact id 2
    torch.testing.assert_close(out.logprobs[1, 0].exp(), torch.tensor(0.15))
    torch.testing.assert_close(out.rest_logmass.exp(), torch.tensor([0.4, 0.3 + 0.2 + 0.1 + 0.4 - 0.15]))
    known = torch.where(out.ids >= 0, out.logprobs.exp(), torch.zeros(()))
    torch.testing.assert_close(known.sum(1) + out.rest_logmass.exp(), torch.ones(2))
    with pytest.raises(ValueError, match="kd.include_label = true"):
        compact_sparse_target(target, sub)

"""Teacher cache: bit packing and codecs round-trip, quantisation error bounds, shard files
(atomic, truncation named), manifest hash checks, batch lookup alignment."""
import math

import numpy as np
import pytest
import torch

from vpmoe.kd.cache import (CacheError, CacheShard, CacheSpec, ShardWriter, TeacherCache, decode_row,
                            dequantize_logprobs, encode_row, new_manifest, pack_bits, quantize_logprobs,
                            reconstruct_logprobs, rice_decode, rice_encode, rice_parameter, unpack_bits,
                            verify_cache, write_json)
from vpmoe.kd.losses import SparseTarget

V = 201088


def teacher_rows(n, k, seed, vocab=V, scale=4.0, return_labels=False):
    """Top-k of a random peaky distribution over the full vocab, as the scorer stores it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * scale
    lp = torch.log_softmax(logits.double(), -1)
    top = lp.topk(k, -1)
    rest = torch.logsumexp(lp.scatter(1, top.indices, -math.inf), -1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    rows = (top.indices.numpy(), top.values.float().numpy(), lp.gather(1, labels[:, None]).squeeze(1).float().numpy(),
            rest.float().numpy(), lp)
    return rows + (labels,) if return_labels else rows


def test_pack_bits_round_trip_random_widths():
    rng = np.random.default_rng(0)
    for width in (1, 5, 11, 18, 31):
        values = rng.integers(0, 2**width, size=1001)
        buf = pack_bits(values, width)
        assert len(buf) == (1001 * width + 7) // 8
        assert np.array_equal(unpack_bits(buf, width, 1001), values)


def test_rice_round_trip_and_parameter_choice():
    rng = np.random.default_rng(1)
    gaps = rng.geometric(1 / 300, size=5000) - 1
    b = rice_parameter(gaps)
    assert 6 <= b <= 10  # near log2(mean * ln 2) ~ 7.7
    low, unary = rice_encode(gaps, b)
    assert np.array_equal(rice_decode(low, unary, b, gaps.size), gaps)
    with pytest.raises(ValueError, match="expected"):
        rice_decode(low, unary, b, gaps.size + 1)


def test_logprob_quantisation_error_bound():
    lp = -np.concatenate([np.linspace(0, 16, 2000), np.random.default_rng(2).exponential(3, 2000)])
    for bits in (6, 8):
        cmax = (1 << bits) - 1
        back = dequantize_logprobs(quantize_logprobs(lp, bits), bits)
        assert back.max() <= 0 and np.isfinite(back).all()
        floor = 4 * np.log(1 / cmax)
        assert back.min() >= floor - 1e-5
        # uniform in u = p^(1/4): |u - u_hat| <= 1 / (2 c_max) above the floor
        above = lp > floor + 1e-3
        du = np.abs(np.exp(lp / 4) - np.exp(back / 4))
        assert np.all(du[above] <= 0.5 / cmax + 1e-7), bits
        assert np.allclose(back[~above], floor, atol=1e-3) or not (~above).any()


@pytest.mark.parametrize("codec", ["rice", "fixed"])
def test_encode_decode_row(codec):
    ids, lps, lab, rest, _ = teacher_rows(37, 16, seed=3)
    spec = CacheSpec(top_k=16, codec=codec, lp_bits=8)
    buf = encode_row(ids, lps, lab, rest, spec)
    ids2, lps2, lab2, rest2 = decode_row(buf, 37, spec)
    for r in range(37):  # rice reorders within a position: compare as id -> lp maps
        a = dict(zip(ids[r].tolist(), lps[r].tolist()))
        b = dict(zip(ids2[r].tolist(), lps2[r].tolist()))
        assert a.keys() == b.keys()
        assert max(abs(a[i] - b[i]) for i in a) < 0.25
    np.testing.assert_allclose(lab2, lab, atol=0.02, rtol=2e-3)
    np.testing.assert_allclose(rest2, rest, atol=0.02, rtol=2e-3)
    if codec == "fixed":
        assert len(buf) == (37 * 16 * 18 + 7) // 8 + 37 * 16 + 4 * 37
    with pytest.raises(ValueError, match="distinct|per position"):
        bad = ids.copy()
        bad[0, 1] = bad[0, 0]
        encode_row(bad if codec == "rice" else ids[:, :3], lps if codec == "rice" else lps[:, :3], lab, rest, spec)


def test_bytes_per_token_and_reconstruction_kl_at_k64():
    ids, lps, lab, rest, true_lp = teacher_rows(64, 64, seed=4, scale=5.0)
    spec = CacheSpec(top_k=64)  # rice, 5-bit log-probs: the default
    buf = encode_row(ids, lps, lab, rest, spec)
    assert len(buf) / 64 <= 150  # the goal at k=64, even for uniform random ids (gap coding's worst case)
    d = decode_row(buf, 64, spec)
    d = [torch.from_numpy(np.asarray(x)) for x in d]  # (ids, lps, label_lp, rest)
    target = SparseTarget(d[0], d[1], d[3], d[2])
    exact = SparseTarget(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(rest))
    # quantisation alone: KL between exact and decoded coarse (top-k + rest) distributions, per position
    def coarse(t):
        order = torch.argsort(t.ids, 1)
        x = torch.cat([t.logprobs.double().gather(1, order), t.rest_logmass.double()[:, None]], 1)
        return torch.log_softmax(x, -1)
    a, b = coarse(exact), coarse(target)
    kl = (a.exp() * (a - b)).sum(1).mean().item()
    assert 0 < kl < 5e-3
    full = reconstruct_logprobs(target, V)
    torch.testing.assert_close(full.exp().sum(1), torch.ones(64, dtype=torch.float64))
    kl_full = (true_lp.exp() * (true_lp - full)).sum(1).mean().item()
    assert kl < kl_full < 1.0


def write_shard(tmp_path, name, rows, spec, seed):
    writer = ShardWriter(tmp_path, name, spec)
    rng = np.random.default_rng(seed)
    kept = []
    for r in range(rows):
        n = int(rng.integers(0, 9))
        ids, lps, lab, rest, _, labels = teacher_rows(n, spec.top_k, seed=seed * 100 + r, vocab=997,
                                                      return_labels=True)
        tokens = rng.integers(0, 997, size=int(rng.integers(n + 2, n + 20)))
        writer.add_row(tokens, ids, lps, lab, rest)
        kept.append((tokens, n, labels))
    return writer.finish(), kept


def make_cache(tmp_path, rows=(3, 4)):
    spec = CacheSpec(top_k=5, vocab_size=997, lp_bits=8)
    shards, kept = [], []
    for i, n in enumerate(rows):
        meta, k = write_shard(tmp_path, f"train-{i:05d}", n, spec, seed=i + 1)
        shards.append((meta["name"], meta["rows"]))
        kept += k
    write_json(tmp_path / "manifest.json", new_manifest(spec, {"id": "t"}, 1.0, "tok-a", "data-a", shards))
    return spec, kept


def test_cache_lookup_by_sample_index_and_alignment_checks(tmp_path):
    spec, kept = make_cache(tmp_path)
    cache = TeacherCache(tmp_path, tokenizer_sha="tok-a", data_hash="data-a")
    assert cache.rows == 7
    picks = [5, 0, 3]
    T = max(len(kept[i][0]) for i in picks) + 3
    tokens = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, i in enumerate(picks):
        toks, n, _ = kept[i]
        tokens[b, :len(toks)] = torch.from_numpy(toks)
        mask[b, 1:1 + n] = True
    target = cache.batch_target(torch.tensor(picks), mask, tokens=tokens)
    assert target.ids.shape == (int(mask.sum()), 5)
    row5 = cache.row(5)
    n5 = kept[5][1]
    torch.testing.assert_close(target.logprobs[:n5], torch.from_numpy(row5[1]))
    torch.testing.assert_close(target.label_logprob[:n5], torch.from_numpy(row5[2]))
    torch.testing.assert_close(target.rest_logmass[:n5], torch.from_numpy(row5[3]))
    bad_mask = mask.clone()
    bad_mask[0, 0] = True
    with pytest.raises(CacheError, match="sample_index=5 has"):
        cache.batch_target(torch.tensor(picks), bad_mask)
    bad_tokens = tokens.clone()
    bad_tokens[1, 0] += 1
    with pytest.raises(CacheError, match="sample_index=0: batch tokens differ"):
        cache.batch_target(torch.tensor(picks), mask, tokens=bad_tokens)
    with pytest.raises(CacheError, match="outside"):
        cache.row(7)


def test_include_label_moves_label_mass_out_of_rest(tmp_path):
    spec, kept = make_cache(tmp_path, rows=(2,))
    cache = TeacherCache(tmp_path)
    toks, n, row_labels = kept[1]
    mask = torch.zeros(1, len(toks), dtype=torch.bool)
    mask[0, :n] = True
    ids = torch.from_numpy(cache.row(1)[0])
    labels = torch.full((1, len(toks)), -100)
    labels[0, :n] = row_labels  # the labels whose teacher log-probs the cache holds
    labels[0, 0] = ids[0, 2]  # inside the top-k: padding slot
    plain = cache.batch_target(torch.tensor([1]), mask)
    with_label = cache.batch_target(torch.tensor([1]), mask, include_label=True, label_ids=labels)
    assert with_label.ids.shape[1] == 6 and with_label.ids[0, 5] == -1
    lab = labels[mask]
    outside = (plain.ids != lab[:, None]).all(1)
    assert not outside[0] and outside[1:].all()
    assert (with_label.ids[outside, 5] == lab[outside]).all()
    # total mass is preserved: rest' + label = rest
    lhs = torch.logaddexp(with_label.rest_logmass[outside].double(), plain.label_logprob[outside].double())
    torch.testing.assert_close(lhs, plain.rest_logmass[outside].double(), atol=1e-4, rtol=1e-4)


def test_mismatched_hashes_are_refused_showing_both(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(CacheError, match="tokenizer.*tok-a.*tok-b"):
        TeacherCache(tmp_path, tokenizer_sha="tok-b")
    with pytest.raises(CacheError, match="data manifest.*data-a.*data-other"):
        TeacherCache(tmp_path, data_hash="data-other")


def test_truncated_or_missing_shard_is_named(tmp_path):
    make_cache(tmp_path)
    path = tmp_path / "train-00001.kdc"
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(CacheError, match="train-00001.*truncated"):
        TeacherCache(tmp_path)
    path.write_bytes(data)
    TeacherCache(tmp_path)
    (tmp_path / "train-00000.json").unlink()
    with pytest.raises(CacheError, match="train-00000 is missing or unfinished"):
        TeacherCache(tmp_path)


def test_corrupt_block_is_named(tmp_path):
    spec, _ = make_cache(tmp_path, rows=(3,))
    path = tmp_path / "train-00000.kdc"
    data = bytearray(path.read_bytes())
    data[0] = 31  # rice parameter byte of row 0: garbage width
    path.write_bytes(bytes(data))
    shard = CacheShard(tmp_path, "train-00000", spec)
    with pytest.raises(CacheError, match="train-00000, row 0"):
        shard.row(0)


def test_verify_catches_a_corrupt_index(tmp_path):
    """The index (.kdi.npy) is checked as the data file is: its offsets and positions must start at
    0, never decrease and end at the record's count (every verify), and its bytes must match the
    sha256 recorded when the shard was written (full verify); either names the index file."""
    make_cache(tmp_path, rows=(5,))
    kdi = tmp_path / "train-00000.kdi.npy"
    good = np.load(kdi)
    assert verify_cache(tmp_path)["rows"] == 5
    bad = good.copy()
    bad[2, 1] = bad[3, 1] + 5  # a cumulative position count past the next row's
    np.save(kdi, bad)
    for full in (True, False):
        with pytest.raises(CacheError, match=r"train-00000\.kdi\.npy: index corrupt \(row 2"):
            verify_cache(tmp_path, full=full)
    bad = good.copy()
    bad[2, 2] ^= 1  # a row's token crc: the structure stays valid, the bytes do not
    np.save(kdi, bad)
    verify_cache(tmp_path, full=False)
    with pytest.raises(CacheError, match=r"train-00000\.kdi\.npy: sha256 mismatch \(corrupt index\)"):
        verify_cache(tmp_path)
    np.save(kdi, good)
    assert verify_cache(tmp_path)["rows"] == 5

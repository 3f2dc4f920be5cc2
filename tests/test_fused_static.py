"""fused_span_loss(static=True): the host-sync-free mode (all N rows, span-0 rows weighted 0) gives
the same loss, stats and gradients as the default mode, and never syncs with the host."""
import math

import pytest
import torch

from vpmoe.kd.fused import fused_span_loss
from vpmoe.kd.losses import DenseTarget, LossSpec, SparseTarget, count_span_tokens

CHUNK = 4
# chunks of 4: [0 0 1 2 | 0 0 0 0 | 0 1 1 2 | 2 0 0 0 | 0 1 2 0 | 2 1 0] -> runs of span 0 cross
# chunk boundaries (rows 4-10, 13-16), chunk 1 is all zeros, the last chunk is ragged
SPANS = torch.tensor([0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 1, 2, 0, 2, 1, 0])


def make_problem(dtype, seed, n=len(SPANS), d=10, vocab=83, k=5, garbage=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, vocab, (n,), generator=g)
    span = SPANS.clone()
    labels[span == 0] = -100  # ignored positions may carry any label
    t_logp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.5, -1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    ids[::3, -2:] = -1  # padding slots after slot 0
    safe = torch.where(ids >= 0, ids, ids[:, :1])
    known = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, safe, True)
    rest = torch.logsumexp(t_logp.masked_fill(known, -math.inf), -1)
    lab_lp = t_logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    logprobs = t_logp.gather(1, safe)
    if garbage:  # what a loader may store at unsupervised rows: all-padding ids, non-finite values
        off = span == 0
        ids[off] = -1
        logprobs[off] = math.nan
        rest[off] = -math.inf
        lab_lp[off] = math.nan
    target = SparseTarget(ids, logprobs.to(dtype), rest.to(dtype), lab_lp.to(dtype))
    return hidden, weight, labels, span, target


def run(hidden, weight, *args, **kwargs):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = fused_span_loss(h, w, *args, **kwargs)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), gh, gw, stats


def assert_same(a, b, tol):
    for x, y in zip(a[:3], b[:3]):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    assert a[3].keys() == b[3].keys()
    assert torch.equal(a[3]["count"], b[3]["count"]) and a[3]["count"].dtype == torch.int64
    for key in a[3]:
        assert a[3][key].dtype == b[3][key].dtype
        torch.testing.assert_close(a[3][key], b[3][key], rtol=tol, atol=tol)


SPECS = [
    LossSpec(),
    LossSpec(kind="fkl", temperature=1.5, ce_weight=0.2),
    LossSpec(kind="rkl", sparse_mode="renorm", temperature=0.7),
    LossSpec(kind="jsd", beta=0.3, ce_weight=0.5),
    LossSpec(kind="tvd", temperature=2.0),
    LossSpec(kind="cwce", temperature=1.3, ce_weight=0.1),  # center from the data, on the device
    LossSpec(kind="cwce", cwce_center=-3.0),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.sparse_mode}-{s.cwce_center}")
def test_static_matches_default(spec, dtype, tol):
    hidden, weight, labels, span, target = make_problem(dtype, seed=SPECS.index(spec))
    # the default mode validates the target at supervised rows only; give it clean unsupervised rows
    clean = make_problem(dtype, seed=SPECS.index(spec), garbage=False)[4]
    for chunk in (CHUNK, None):
        ref = run(hidden, weight, labels, span, spec, clean, 0.7, 1.3, chunk_size=chunk)
        out = run(hidden, weight, labels, span, spec, target, 0.7, 1.3, chunk_size=chunk, static=True)
        assert_same(out, ref, tol)
        assert torch.all(out[1][span == 0] == 0)  # unsupervised rows: exactly zero gradient
        assert all(out[3][k][0] == 0 for k in out[3])
        assert torch.isfinite(out[0]) and torch.isfinite(out[2]).all()


def test_static_with_global_counts_and_no_grad():
    hidden, weight, labels, span, target = make_problem(torch.float64, seed=20, garbage=False)
    spec = LossSpec(kind="fkl", ce_weight=0.25)
    counts = count_span_tokens(span) * 3
    ref = run(hidden, weight, labels, span, spec, target, span_token_counts=counts, chunk_size=CHUNK)
    out = run(hidden, weight, labels, span, spec, target, span_token_counts=counts, chunk_size=CHUNK, static=True)
    assert_same(out, ref, 1e-10)
    with torch.no_grad():
        loss, stats = fused_span_loss(hidden, weight, labels, span, spec, target, chunk_size=CHUNK, static=True)
    ref_loss, ref_stats = fused_span_loss(hidden, weight, labels, span, spec, target, chunk_size=CHUNK)
    torch.testing.assert_close(loss, ref_loss.detach())
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key])


def test_static_all_unsupervised_is_zero():
    hidden, weight, labels, _, target = make_problem(torch.float32, seed=21)
    span = torch.zeros(len(SPANS), dtype=torch.long)
    out = run(hidden, weight, labels, span, LossSpec(kind="cwce"), target, chunk_size=CHUNK, static=True)
    assert out[0].item() == 0 and torch.all(out[1] == 0) and torch.all(out[2] == 0)
    assert all(torch.all(v == 0) for v in out[3].values())


def test_static_mode_never_syncs(monkeypatch):
    hidden, weight, labels, span, target = make_problem(torch.float32, seed=22)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync / data-dependent shape in static mode")

    gate = torch.zeros(())
    cases = [(LossSpec(), None, None), (LossSpec(kind="jsd", ce_weight=0.3), target, None),
             (LossSpec(kind="cwce"), target, None), (LossSpec(kind="fkl", ce_weight=0.5), target, gate)]
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, forbidden)
        for name in ("nonzero", "bincount", "unique", "masked_select"):
            m.setattr(torch, name, forbidden)
        for spec, tgt, kd_gate in cases:
            h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            loss, stats = fused_span_loss(h, w, labels, span, spec, tgt, chunk_size=CHUNK, static=True,
                                          kd_gate=kd_gate)
            loss.backward()
            assert h.grad is not None and w.grad is not None
    with pytest.raises(AssertionError, match="host sync"):  # the patch works: default mode does sync
        with monkeypatch.context() as m:
            m.setattr(torch, "nonzero", forbidden)
            fused_span_loss(hidden, weight, labels, span, LossSpec())


def test_static_rejects_what_it_cannot_do():
    hidden, weight, labels, span, target = make_problem(torch.float64, seed=23)
    with pytest.raises(ValueError, match="sparse targets only"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"),
                        DenseTarget(logits=torch.zeros(len(SPANS), 83)), static=True)
    with pytest.raises(ValueError, match="N=23 rows"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), target.select(span > 0), static=True)
    with pytest.raises(ValueError, match="needs a teacher target"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), static=True)
    with pytest.raises(ValueError, match="expected"):
        fused_span_loss(hidden, weight, labels[:-1], span, LossSpec(), static=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("spec", SPECS[1:], ids=lambda s: f"{s.kind}-{s.sparse_mode}-{s.cwce_center}")
def test_kd_gate_is_the_kd_loss_or_plain_ce(spec, dtype, tol):
    """One static KD call, two steps: gate 1 = the KD loss itself; gate 0 = the plain CE loss (its
    loss, gradients, loss/ce sums) with zero KD stats, whatever the target holds."""
    hidden, weight, labels, span, target = make_problem(dtype, seed=30 + SPECS.index(spec))
    clean = make_problem(dtype, seed=30 + SPECS.index(spec), garbage=False)[4]
    one, zero = torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)
    kd_ref = run(hidden, weight, labels, span, spec, clean, 0.7, 1.3, chunk_size=CHUNK)
    kd_out = run(hidden, weight, labels, span, spec, target, 0.7, 1.3, chunk_size=CHUNK, static=True, kd_gate=one)
    assert_same(kd_out, kd_ref, tol)
    ce_ref = run(hidden, weight, labels, span, LossSpec(), None, 0.7, 1.3, chunk_size=CHUNK)
    ce_out = run(hidden, weight, labels, span, spec, target, 0.7, 1.3, chunk_size=CHUNK, static=True, kd_gate=zero)
    for x, y in zip(ce_out[:3], ce_ref[:3]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    for key in ("count", "loss_sum", "ce_sum"):
        torch.testing.assert_close(ce_out[3][key], ce_ref[3][key], rtol=tol, atol=tol)
    assert all(torch.all(ce_out[3][k] == 0) for k in ("kd_sum", "kl_sum", "teacher_logp_sum") if k in ce_out[3])
    assert kd_out[3]["kl_sum"][1:].abs().sum() > 0  # so the zeros above are the gate's doing


def test_kd_gate_refusals():
    hidden, weight, labels, span, target = make_problem(torch.float64, seed=40)
    gate = torch.ones((), dtype=torch.float64)
    with pytest.raises(ValueError, match="kd_gate is for static=True"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), target, kd_gate=gate)
    with pytest.raises(ValueError, match="0-d tensor and needs a KD loss"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(), None, static=True, kd_gate=gate)
    with pytest.raises(ValueError, match="0-d tensor"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), target, static=True, kd_gate=gate[None])


@pytest.mark.parametrize("static", [False, True])
def test_head_low_stands_in_for_the_cast_head(static):
    """`head_low` (the kept bf16 head, `FastBody.head_low`): equal to the cast, the same loss, stats
    and gradients bit for bit, the head's gradient still fp32 on the master; a different copy is
    what the products read (so it is used, not re-cast); a wrong shape or dtype is refused."""
    hidden, weight, labels, span, target = make_problem(torch.float32, seed=11)
    hidden = hidden.bfloat16()
    spec = LossSpec(kind="fkl", temperature=1.5, ce_weight=0.2)
    kw = {"chunk_size": CHUNK, "static": static}
    ref = run(hidden, weight, labels, span, spec, target, **kw)
    out = run(hidden, weight, labels, span, spec, target, head_low=weight.bfloat16(), **kw)
    assert out[2].dtype == torch.float32
    assert_same(out, ref, 0.0)
    other = run(hidden, weight, labels, span, spec, target, head_low=(weight * 1.5).bfloat16(), **kw)
    assert not torch.equal(other[0], ref[0])
    for bad in (weight.bfloat16()[:-1], weight):  # one row short; fp32, not hidden's dtype
        with pytest.raises(ValueError, match="head_low"):
            run(hidden, weight, labels, span, spec, target, head_low=bad, **kw)

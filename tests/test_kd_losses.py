"""KD/CE losses: the reference against independent textbook math, and the fused path against the
reference (value, gradients, stats) for every loss kind, sparse and dense targets."""
import math

import pytest
import torch
import torch.nn.functional as F

from vpmoe.config import ConfigError, from_dict
from vpmoe.kd.fused import fused_span_loss
from vpmoe.kd.losses import (DenseTarget, LossSpec, SparseTarget, count_span_tokens,
                             divergence_reference, span_loss_reference, span_means)

KINDS = ["ce", "fkl", "rkl", "jsd", "tvd", "cwce"]


def make_problem(n=29, d=12, vocab=97, k=6, dtype=torch.float64, seed=0, pad_every=3, spans=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, vocab, (n,), generator=g)
    span = torch.randint(0, 3, (n,), generator=g) if spans is None else spans
    labels[span == 0] = -100  # ignored positions may carry any label
    t_logits = torch.randn(n, vocab, generator=g, dtype=dtype) * 2.5
    t_logp = torch.log_softmax(t_logits.double(), -1)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    if pad_every:
        ids[::pad_every, -2:] = -1  # padding slots after slot 0
    safe = torch.where(ids >= 0, ids, ids[:, :1])
    known = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, safe, True)
    rest = torch.logsumexp(t_logp.masked_fill(known, -math.inf), -1)
    lab_lp = t_logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    sparse = SparseTarget(ids, t_logp.gather(1, safe).to(dtype), rest.to(dtype), lab_lp.to(dtype))
    return hidden, weight, labels, span, sparse, DenseTarget(logits=t_logits)


def loss_and_grads(fn, hidden, weight, *args, **kwargs):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = fn(h, w, *args, **kwargs)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), gh, gw, stats


def assert_close_all(a, b, rtol, atol):
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x.to(y.dtype), y, rtol=rtol, atol=atol)
    for key in a[3]:
        torch.testing.assert_close(a[3][key].double(), b[3][key].double(), rtol=rtol, atol=atol * 10)


# ------------------------------------------------------------------ reference vs textbook math

def test_reference_ce_is_span_normalised_cross_entropy():
    hidden, weight, labels, span, _, _ = make_problem()
    loss, stats = span_loss_reference(hidden, weight, labels, span, LossSpec(), w_r=0.3, w_f=2.0)
    logits = hidden @ weight.T
    expect = 0.0
    for s, w in ((1, 0.3), (2, 2.0)):
        m = span == s
        expect += w * F.cross_entropy(logits[m], labels[m])
    torch.testing.assert_close(loss, expect)
    assert stats["count"].tolist() == [0, int((span == 1).sum()), int((span == 2).sum())]


def test_reference_dense_fkl_matches_kl_div_and_t2_scaling():
    hidden, weight, labels, span, _, dense = make_problem()
    spans = torch.ones_like(span)
    spec = LossSpec(kind="fkl", temperature=2.0)
    loss, _ = span_loss_reference(hidden, weight, labels.clamp_min(0), spans, spec, dense, w_r=1.0)
    s = torch.log_softmax(hidden @ weight.T / 2.0, -1)
    t = torch.log_softmax(dense.logits / 2.0, -1)
    expect = 4.0 * F.kl_div(s, t, log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss, expect)


def test_divergence_reference_textbook_values():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    lp, lq = p.log(), q.log()
    torch.testing.assert_close(divergence_reference("tvd", lp, lq, 0.5), 0.5 * (p - q).abs().sum(-1))
    torch.testing.assert_close(divergence_reference("rkl", lp, lq, 0.5), (q * (lq - lp)).sum(-1))
    m = 0.5 * (p + q)  # beta = 0.5: the symmetric Jensen-Shannon divergence
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence_reference("jsd", lp, lq, 0.5), js)
    torch.testing.assert_close(divergence_reference("jsd", lq, lp, 0.5), js)  # symmetric
    assert (divergence_reference("fkl", lp, lp, 0.5).abs() < 1e-12).all()


def test_sparse_tail_target_with_all_ids_but_one_equals_dense_fkl():
    # with K = V - 1 known ids the rest bucket is a single token: coarse == full distribution
    hidden, weight, labels, span, _, dense = make_problem(vocab=11, k=10, pad_every=0)
    t_logp = torch.log_softmax(dense.logits, -1)
    order = torch.argsort(t_logp, -1, descending=True)
    sparse = SparseTarget(order[:, :10], t_logp.gather(1, order[:, :10]), t_logp.gather(1, order[:, 10:]).squeeze(1))
    spec = LossSpec(kind="fkl")
    a, _ = span_loss_reference(hidden, weight, labels, span, spec, sparse)
    b, _ = span_loss_reference(hidden, weight, labels, span, spec, dense)
    torch.testing.assert_close(a, b)


def test_sparse_loss_is_zero_when_student_equals_teacher():
    hidden, weight, labels, span, _, _ = make_problem(pad_every=0)
    s_logp = torch.log_softmax(hidden @ weight.T, -1)
    top = torch.topk(s_logp, 6, -1)
    known = torch.zeros_like(s_logp, dtype=torch.bool).scatter_(1, top.indices, True)
    rest = torch.logsumexp(s_logp.masked_fill(known, -math.inf), -1)
    target = SparseTarget(top.indices, top.values, rest)
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        for mode in ("tail", "renorm"):
            loss, _ = span_loss_reference(hidden, weight, labels, span,
                                          LossSpec(kind=kind, sparse_mode=mode, temperature=1.7), target)
            assert abs(loss.item()) < 1e-10, (kind, mode)


# ------------------------------------------------------------------ fused vs reference

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dense", [False, True])
def test_fused_matches_reference_fp64(kind, dense):
    hidden, weight, labels, span, sparse, dense_t = make_problem(seed=KINDS.index(kind) + 10 * dense)
    target = dense_t if dense else sparse
    for temp, mode, alpha in ((1.0, "tail", 0.0), (2.0, "renorm", 0.3), (0.6, "tail", 0.5)):
        spec = LossSpec(kind=kind, temperature=temp, sparse_mode=mode, ce_weight=alpha, beta=0.3)
        ref = loss_and_grads(span_loss_reference, hidden, weight, labels, span, spec, target, 0.7, 1.3)
        out = loss_and_grads(fused_span_loss, hidden, weight, labels, span, spec, target, 0.7, 1.3,
                             chunk_size=4)  # many chunks, a ragged last one
        assert_close_all(out, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_reference_fp32_with_supervised_rows_target(kind):
    hidden, weight, labels, span, sparse, dense = make_problem(dtype=torch.float32, seed=3, n=40, vocab=300)
    sel = torch.nonzero(span > 0).squeeze(1)
    for target in (sparse.select(sel), DenseTarget(logits=dense.logits[sel])):  # M-row form
        spec = LossSpec(kind=kind, temperature=1.5, ce_weight=0.2)
        h64, w64 = hidden.double(), weight.double()
        t64 = (SparseTarget(target.ids, target.logprobs.double(), target.rest_logmass.double(),
                            target.label_logprob.double())
               if isinstance(target, SparseTarget) else DenseTarget(logits=target.logits.double()))
        ref = loss_and_grads(span_loss_reference, h64, w64, labels, span, spec, t64)
        out = loss_and_grads(fused_span_loss, hidden, weight, labels, span, spec, target, chunk_size=7)
        assert_close_all(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_dense_from_teacher_hidden_matches_logits_form():
    hidden, weight, labels, span, _, _ = make_problem(seed=5)
    g = torch.Generator().manual_seed(9)
    t_hidden, t_head = torch.randn(29, 20, generator=g, dtype=torch.float64), torch.randn(97, 20, generator=g, dtype=torch.float64)
    spec = LossSpec(kind="jsd", temperature=1.3)
    a = loss_and_grads(fused_span_loss, hidden, weight, labels, span, spec,
                       DenseTarget(hidden=t_hidden, head_weight=t_head), chunk_size=5)
    b = loss_and_grads(span_loss_reference, hidden, weight, labels, span, spec,
                       DenseTarget(logits=t_hidden @ t_head.T))
    assert_close_all(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("missing", [1, 2, None])
def test_empty_spans_contribute_zero(missing):
    n = 24
    span = torch.where(torch.arange(n) % 3 == 0, 0, torch.where(torch.arange(n) % 3 == 1, 1, 2))
    if missing is None:
        span = torch.zeros(n, dtype=torch.long)
    else:
        span[span == missing] = 0
    hidden, weight, labels, span, sparse, _ = make_problem(n=n, spans=span, seed=7)
    spec = LossSpec(kind="fkl", ce_weight=0.5)
    ref = loss_and_grads(span_loss_reference, hidden, weight, labels, span, spec, sparse, 1.0, 1.0)
    out = loss_and_grads(fused_span_loss, hidden, weight, labels, span, spec, sparse, 1.0, 1.0, chunk_size=5)
    assert_close_all(out, ref, rtol=1e-9, atol=1e-10)
    if missing is None:
        assert out[0].item() == 0.0 and out[1].abs().max() == 0 and out[2].abs().max() == 0
    else:  # only the present span counts: equals the mean over it alone
        present = 3 - missing
        loss_only, _ = span_loss_reference(hidden, weight, labels, torch.where(span == present, 1, 0), spec, sparse)
        torch.testing.assert_close(out[0], loss_only)


def test_global_normalisers_make_microbatch_sums_exact():
    hidden, weight, labels, span, sparse, _ = make_problem(n=36, seed=11)
    spec = LossSpec(kind="rkl", ce_weight=0.25)
    full = loss_and_grads(fused_span_loss, hidden, weight, labels, span, spec, sparse, 0.4, 1.6)
    counts = count_span_tokens(span)
    total, gw = 0.0, torch.zeros_like(weight)
    for part in torch.arange(36).chunk(3):
        out = loss_and_grads(fused_span_loss, hidden[part], weight, labels[part], span[part], spec,
                             sparse.select(part), 0.4, 1.6, span_token_counts=counts)
        total, gw = total + out[0], gw + out[2]
    torch.testing.assert_close(total, full[0])
    torch.testing.assert_close(gw, full[2])


def test_stats_and_span_means():
    hidden, weight, labels, span, sparse, _ = make_problem(seed=2)
    _, stats = fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), sparse)
    means = span_means(stats)
    sel = span == 2
    torch.testing.assert_close(torch.tensor(means["teacher_logp/final"], dtype=torch.float64),
                               sparse.label_logprob[sel].mean())
    assert means["kl/reasoning"] > 0 and means["loss/final"] == pytest.approx(means["kd/final"])


def test_no_grad_forward_matches_and_skips_gradients():
    hidden, weight, labels, span, sparse, _ = make_problem(seed=4)
    spec = LossSpec(kind="tvd")
    with torch.no_grad():
        a, _ = fused_span_loss(hidden, weight, labels, span, spec, sparse)
    b, _ = span_loss_reference(hidden, weight, labels, span, spec, sparse)
    torch.testing.assert_close(a, b)


def test_upstream_gradient_scale_is_applied():
    hidden, weight, labels, span, sparse, _ = make_problem(seed=6)
    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_span_loss(h, weight, labels, span, LossSpec(kind="jsd"), sparse)
    (3.5 * loss).backward()
    h2 = hidden.clone().requires_grad_(True)
    ref, _ = span_loss_reference(h2, weight, labels, span, LossSpec(kind="jsd"), sparse)
    (3.5 * ref).backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_bf16_fused_close_to_fp32_reference():
    hidden, weight, labels, span, sparse, _ = make_problem(dtype=torch.float32, seed=8, n=64, vocab=500, d=32)
    spec = LossSpec(kind="fkl", ce_weight=0.5)
    ref = loss_and_grads(span_loss_reference, hidden, weight, labels, span, spec, sparse)
    out = loss_and_grads(fused_span_loss, hidden.bfloat16(), weight.bfloat16(), labels, span, spec, sparse)
    torch.testing.assert_close(out[0].float(), ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[1].float(), ref[1], rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(out[2].float(), ref[2], rtol=5e-2, atol=5e-3)


def test_fp32_master_head_under_bf16_compute():
    """The trainer's mix: bf16 hidden states, the fp32 master head. The head gradient stays fp32,
    accumulated over several chunks (on the CPU by the cast-and-add branch; CUDA folds it into the
    GEMM, tests/gpu), and equals the float64 loss over the bf16-rounded head up to bf16 rounding of
    the logits gradient."""
    hidden, weight, labels, span, sparse, _ = make_problem(dtype=torch.float32, seed=9, n=64, vocab=500, d=32)
    spec = LossSpec(kind="fkl", ce_weight=0.5)
    h16 = hidden.bfloat16()
    out = loss_and_grads(fused_span_loss, h16, weight, labels, span, spec, sparse, chunk_size=16)
    ref = loss_and_grads(fused_span_loss, h16.double(), weight.bfloat16().double(), labels, span, spec,
                         sparse, chunk_size=16)
    assert out[2].dtype == torch.float32
    err = ((out[2].double() - ref[2]).norm() / ref[2].norm()).item()
    assert err < 1e-2, err
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("acc_dtype, dtype", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_head_gradient_first_chunk_writes_without_reading(acc_dtype, dtype):
    """The fused loss's head gradient starts as an uninitialised buffer (no zero fill over [V, d]):
    the first chunk's product overwrites it whatever it holds (NaN here), later chunks add. Both
    CPU branches: the same-dtype GEMM (beta 0) and the fp32 accumulator of bf16 operands."""
    from vpmoe.kd.fused import _accumulate_grad_weight

    gen = torch.Generator().manual_seed(4)
    gz = [torch.randn(6, 50, generator=gen).to(dtype) for _ in range(2)]
    h = [torch.randn(6, 8, generator=gen).to(dtype) for _ in range(2)]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12  # the CPU rounds a bf16 product before adding it

    def rel_err(want):
        return ((gw.double() - want).norm() / want.norm()).item()

    gw = torch.full((50, 8), float("nan"), dtype=acc_dtype)
    _accumulate_grad_weight(gw, gz[0], h[0], first=True)
    first = gz[0].double().T @ h[0].double()
    assert rel_err(first) < tol
    _accumulate_grad_weight(gw, gz[1], h[1])
    assert rel_err(first + gz[1].double().T @ h[1].double()) < tol


def test_bad_inputs_are_named():
    hidden, weight, labels, span, sparse, _ = make_problem()
    bad = labels.clone()
    pos = int(torch.nonzero(span > 0)[0])
    bad[pos] = -100
    with pytest.raises(ValueError, match=f"position {pos}"):
        fused_span_loss(hidden, weight, bad, span, LossSpec())
    with pytest.raises(ValueError, match="needs a teacher target"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"))
    with pytest.raises(ValueError, match="rows"):
        fused_span_loss(hidden, weight, labels, span, LossSpec(kind="fkl"), sparse.select(slice(0, 3)))
    with pytest.raises(ConfigError, match="beta"):
        from_dict(LossSpec, {"kind": "jsd", "beta": 1.0})
    with pytest.raises(ConfigError, match="kind"):
        from_dict(LossSpec, {"kind": "kl"})


def test_gradient_only_for_inputs_that_need_it():
    hidden, weight, labels, span, sparse, _ = make_problem(seed=12)
    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_span_loss(h, weight, labels, span, LossSpec(kind="fkl"), sparse)  # frozen head
    (gh,) = torch.autograd.grad(loss, [h])
    ref = loss_and_grads(span_loss_reference, hidden, weight, labels, span, LossSpec(kind="fkl"), sparse)
    torch.testing.assert_close(gh, ref[1])
    w = weight.clone().requires_grad_(True)
    loss, _ = fused_span_loss(hidden, w, labels, span, LossSpec(kind="fkl"), sparse)  # frozen trunk
    (gw,) = torch.autograd.grad(loss, [w])
    torch.testing.assert_close(gw, ref[2])


def test_rest_without_removes_a_named_ids_mass():
    """The rest bucket less one id's mass, against plain arithmetic; ~1e-30 of it where nothing is
    left (or the id claims more than the bucket held), and never under the floor."""
    from vpmoe.kd.losses import TEACHER_LOGP_FLOOR, rest_without

    rest, lp = torch.tensor([0.5, 0.9, 0.2, 1e-3]).log(), torch.tensor([0.2, 0.9, 0.3, 1e-9]).log()
    out = rest_without(rest.float(), lp.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[[0, 3]].exp(), torch.tensor([0.3, 1e-3 - 1e-9], dtype=torch.float64), rtol=1e-6, atol=0)
    assert (out[1:3] - rest[1:3].double()).exp().max() <= 1.01e-30
    assert rest_without(torch.tensor([-99.0]), torch.tensor([-99.0])).item() == TEACHER_LOGP_FLOOR


def test_auto_chunk_rows_follow_the_byte_budgets():
    """Rows per chunk: the largest power of two whose [C, V] logits fit the budget, a quarter of it
    for dense targets, and twice the CUDA budget where the step keeps every block's activations
    (what `vpmoe train` and bench/train_step.py pass without checkpointing)."""
    from vpmoe.kd import fused as KF

    auto_chunk_size = KF.auto_chunk_size

    V = 201088  # one bf16 logits row: 402,176 bytes
    assert auto_chunk_size(V, torch.bfloat16, False, cuda=True) == 2048  # 1 GiB / row = 2669.8
    assert auto_chunk_size(V, torch.bfloat16, False, cuda=True, kept=True) == 4096  # 2 GiB / row = 5339.6
    assert auto_chunk_size(V, torch.bfloat16, True, cuda=True, kept=True) == 1024  # a quarter: 1334.9
    assert auto_chunk_size(V, torch.float32, False, cuda=False) == 256  # 256 MiB / 804,352 = 333.7
    assert auto_chunk_size(V, torch.float32, False, cuda=False, kept=True) == 256  # kept: CUDA only
    for budget, kw in ((KF.CHUNK_BYTES, {}), (KF.CUDA_CHUNK_BYTES, {"cuda": True}),
                       (KF.CUDA_KEPT_CHUNK_BYTES, {"cuda": True, "kept": True})):
        rows = auto_chunk_size(50_000, torch.bfloat16, False, **kw)
        assert rows * 50_000 * 2 <= budget < 2 * rows * 50_000 * 2

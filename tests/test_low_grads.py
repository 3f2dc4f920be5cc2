"""The expert weights' gradients in bf16 (`graphed.LOW_GRADS`, `FastBody.use_low_grads`: holder
leaves take them; `FastMuonAdamW.step(grads=...)`) against the fp32 master gradients of the same
backward:
- the weight-gradient kernel's bf16 output (`gathered_wgrad(low=True)`, the Triton interpreter) is
  its fp32 output rounded to nearest, element for element, and its sums of squares are the rounded
  values' (float64);
- through FastBody (eager on the CPU's grouped-GEMM fallback; compiled through AOTAutograd with the
  kernel under the interpreter), with kept copies or checkpointed blocks: every holder's gradient
  is the bf16 rounding of the master gradient the default path gives, the masters get none, every
  other gradient is bit-equal; a second micro-batch adds into the bf16 gradients in place, giving
  the rounding of the default path's fp32 sum;
- the optimizer given those gradients takes the step the reference takes from the same values held
  in fp32 `.grad`s: bit-equal with clipping off, to rounding with it on (the norm's sums differ).
The GPU's graphed step: tests/gpu/test_gpu_graphed.py."""
import copy

import pytest
import torch

from tests.test_model import randomize, small
from tests.triton_interpreter import run_in_interpreter
from vpmoe.model import graphed as G
from vpmoe.model.fast import FastBody
from vpmoe.model.model import VpMoE
from vpmoe.train.optim import OptimConfig, build_optimizer
from vpmoe.train.optim_fast import FastMuonAdamW


def _bodies(compiled: bool, grad_sq: bool = False, copies: bool = True, checkpoint: bool = False,
            expert_ffn: int = 16):
    """(model, body, optimizer) twice, the same weights: the masters take the gradients / holders do.
    `expert_ffn` 8: expert matrices 4x wider than tall, which Muon orthogonalises on the Gram side."""
    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, expert_ffn=expert_ffn, n_experts=8)
    m0 = randomize(VpMoE(cfg), seed=11)
    runs = []
    for low in (False, True):
        model = copy.deepcopy(m0)
        body = FastBody(model, compile=compiled, compile_backend="aot_eager", dtype=torch.bfloat16,
                        checkpoint=checkpoint)
        body.grad_sq = grad_sq
        opt = FastMuonAdamW(build_optimizer(model, OptimConfig()), max_grad_norm=0.0, compile=False)
        opt.weight_copies = body.use_weight_copies(copies)
        assert bool(opt.weight_copies) == (copies and not checkpoint)
        assert body.use_low_grads(low) == (2 * len(model.moe_layers()) if low else 0)
        for layer in body.holders.values():
            for _, holder in layer.values():
                assert holder.untyped_storage().nbytes() == 2 and holder.is_leaf  # no memory of its own
        runs.append((model, body, opt))
    return cfg, runs


def _backward(model, body, tokens, doc, clear: bool = True):
    if clear:
        model.zero_grad(set_to_none=True)
        body.clear_low_grads()
    hidden, aux, _ = body(tokens, doc)
    w_out = torch.linspace(-1, 1, hidden.numel()).view(hidden.shape)
    ((hidden.float() * w_out).sum() + aux).backward()
    return hidden.detach()


def _check_gradients(cfg, plain, low, tokens, doc) -> None:
    h0, h1 = _backward(*plain[:2], tokens, doc), _backward(*low[:2], tokens, doc)
    assert torch.equal(h0, h1)
    given = low[1].low_grads()
    experts = {id(p) for m in low[0].moe_layers() for p in (m.w_up, m.w_down)}
    assert set(given) == experts and len(experts) == 2 * len(low[0].moe_layers()) >= 4
    for (n, p0), p1 in zip(plain[0].named_parameters(), low[0].parameters()):
        if id(p1) in experts:
            assert p1.grad is None, n
            g = given[id(p1)]
            assert g.dtype == torch.bfloat16 and p0.grad.dtype == torch.float32
            assert torch.equal(g, p0.grad.to(torch.bfloat16)), n
            assert g.abs().sum() > 0, n
        elif p0.grad is not None:
            assert torch.equal(p0.grad, p1.grad), n


LAYOUTS = [(True, False), (False, True)]  # (copies kept, blocks checkpointed): holders either way


@pytest.mark.parametrize("copies, checkpoint", LAYOUTS)
@pytest.mark.parametrize("above_row_limit", [False, True])
def test_holders_take_the_expert_gradients_in_bf16_and_the_optimizer_steps_from_them(above_row_limit, copies,
                                                                                     checkpoint, monkeypatch):
    """Eager CPU (the grouped-GEMM fallback writes bf16 weight gradients that the default path
    widens): three steps, the optimizer bit-equal to the reference given the same values in fp32.
    `above_row_limit`: micro-batches above the gathered kernel's row limit (grouped-GEMM weight
    gradients on the GPU too)."""
    from vpmoe.model import kernels as K

    if above_row_limit:
        monkeypatch.setattr(K, "GATHERED_WGRAD_MAX_ROWS", 0)
    cfg, (plain, low) = _bodies(compiled=False, copies=copies, checkpoint=checkpoint)
    gen = torch.Generator().manual_seed(2)
    doc = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
    for step in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=gen)
        _check_gradients(cfg, plain, low, tokens, doc)
        given = low[1].low_grads()
        for (_, p0), p1 in zip(plain[0].named_parameters(), low[0].parameters()):
            if p1.grad is None and id(p1) in given:
                p0.grad = given[id(p1)].float()  # the same values, fp32, as .grad
        n0 = plain[2].step()
        n1 = low[2].step(grads=given)
        for body in (plain[1], low[1]):
            body.mark_copies_current()
        torch.testing.assert_close(n1, n0, rtol=1e-6, atol=0)
        for (n, a), b in zip(plain[0].named_parameters(), low[0].parameters()):
            assert torch.equal(a, b), (step, n)
        for master, copy_, _ in low[1]._copy_entries():
            assert torch.equal(copy_.detach(), master.detach().to(torch.bfloat16))


@pytest.mark.parametrize("copies, checkpoint", LAYOUTS)
def test_micro_batches_add_into_the_bf16_gradients_in_place(copies, checkpoint):
    """`LOW_GRADS = "always"`: a second backward before the step adds into the holders' bf16
    gradients (autograd's in-place accumulation, one rounding of the fp32 sum), so they are the
    default path's fp32 sums rounded once, in the same buffers; every other gradient is bit-equal."""
    cfg, (plain, low) = _bodies(compiled=False, copies=copies, checkpoint=checkpoint)
    gen = torch.Generator().manual_seed(5)
    doc = torch.tensor([[0] * 13 + [1] * 7, [0] * 20])
    first, second = (torch.randint(0, cfg.vocab_size, (2, 20), generator=gen) for _ in range(2))
    for model, body, _ in (plain, low):
        _backward(model, body, first, doc)
    buffers = {key: g.data_ptr() for key, g in low[1].low_grads().items()}
    singles = {key: g.clone() for key, g in low[1].low_grads().items()}
    for model, body, _ in (plain, low):
        _backward(model, body, second, doc, clear=False)
    given = low[1].low_grads()
    assert {key: g.data_ptr() for key, g in given.items()} == buffers
    for (n, p0), p1 in zip(plain[0].named_parameters(), low[0].parameters()):
        if id(p1) in given:
            assert p1.grad is None, n
            assert torch.equal(given[id(p1)], p0.grad.to(torch.bfloat16)), n
            assert not torch.equal(given[id(p1)], singles[id(p1)]), n  # the second part was added
        elif p0.grad is not None:
            assert torch.equal(p0.grad, p1.grad), n


def test_low_grads_setting():
    cases = [(1, True), (2, True), (G.LOW_GRADS_MAX_MICRO, True), (G.LOW_GRADS_MAX_MICRO + 1, True),
             (2, "always"), (64, "always"), (1, False), (2, False)]
    assert [G.low_grads_wanted(m, s) for m, s in cases] == [True, True, True, False, True, True, False, False]
    with pytest.raises(ValueError, match="graphed.LOW_GRADS must be True, False or 'always'"):
        G.low_grads_wanted(1, "on")
    model = VpMoE(small(n_layers=2, d_model=32, expert_ffn=16, n_experts=8))
    assert FastBody(model, compile=False, dtype=torch.float32).use_low_grads(True) == 0  # an fp32 body: fp32 grads


def test_clipping_from_given_gradients_matches_the_fp32_reads():
    """With clipping on, the norm over bf16 gradients (fp32 sums) equals the norm of the same values
    in fp32 to rounding, and so do the updates."""
    cfg, (plain, low) = _bodies(compiled=False)
    for run in (plain, low):
        run[2].max_norm = 1e-3  # far below the gradients' norm: every step clips
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    doc = torch.zeros(2, 20, dtype=torch.long)
    _check_gradients(cfg, plain, low, tokens, doc)
    given = low[1].low_grads()
    for p0, p1 in zip(plain[0].parameters(), low[0].parameters()):
        if id(p1) in given:
            p0.grad = given[id(p1)].float()
    every = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in plain[0].parameters()
                                                  if p.grad is not None]))
    torch.testing.assert_close(low[2].grad_norm({}, None, given).double(), every, rtol=1e-6, atol=0)
    plain[2].step()
    low[2].step(grads=given)
    for (n, a), b in zip(plain[0].named_parameters(), low[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


def test_given_gradients_are_checked():
    cfg, (_, low) = _bodies(compiled=False)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    _backward(*low[:2], tokens, torch.zeros(2, 20, dtype=torch.long))
    given = low[1].low_grads()
    embed = low[0].embed.weight
    with pytest.raises(ValueError, match="Muon parameters only"):
        low[2].step(grads={**given, id(embed): torch.zeros_like(embed)})
    master = next(p for p in low[0].parameters() if id(p) in given)
    master.grad = given[id(master)].float()
    with pytest.raises(ValueError, match="both a .grad and a gradient given apart"):
        low[2].step(grads=given)


def check_kernel_path() -> None:
    """Under the Triton interpreter: `gathered_wgrad(low=True)` is the fp32 result rounded to nearest
    with the rounded values' sums of squares; FastBody compiled through AOTAutograd with `grad_sq`:
    the holders' gradients are the masters' rounded, and the known sums of squares are theirs."""
    from vpmoe.model import moe_fused as MF
    from vpmoe.model import wgrad as W
    from vpmoe.model.kernels import Routing

    assert MF.interpreting()
    gen = torch.Generator().manual_seed(7)
    N, k, d, H, E = 29, 3, 40, 24, 6
    scores = torch.rand(N, E, generator=gen)
    scores[:, 0] += 0.6
    scores[:, 1] = -1.0
    r = Routing(scores.topk(k, dim=-1).indices, E)
    x, g = torch.randn(N, d, generator=gen).bfloat16(), torch.randn(N * k, H, generator=gen).bfloat16()
    u, gy = torch.randn(N * k, H, generator=gen).bfloat16(), torch.randn(N, d, generator=gen).bfloat16()
    for a, b, gather_a in ((x, g, True), (u, gy, False)):
        dw, db, _ = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a, True)
        dw_lo, db_lo, sq_lo = W.gathered_wgrad(a, b, r.token, r.offsets, gather_a, gather_a, True, True)
        assert dw.dtype == torch.float32 and dw_lo.dtype == torch.bfloat16
        assert torch.equal(dw_lo, dw.to(torch.bfloat16)) and torch.equal(db_lo, db)
        torch.testing.assert_close(sq_lo.double().sum(), dw_lo.double().square().sum(), rtol=1e-6, atol=0)
        assert not torch.equal(dw_lo.float(), dw)  # the rounding is real at these values

    cfg, (plain, low) = _bodies(compiled=True, grad_sq=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    doc = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
    _check_gradients(cfg, plain, low, tokens, doc)
    assert set(low[1].compile_modes().values()) == {"fullgraph"}, low[1].compile_modes()
    known, given = low[1].known_grad_sq(), low[1].low_grads()
    assert set(given) <= set(known)
    for key, grad in given.items():
        torch.testing.assert_close(known[key].double().sum(), grad.double().square().sum(), rtol=1e-6, atol=0)
    print("checked")


def test_kernel_path_in_triton_interpreter():
    run_in_interpreter("tests.test_low_grads", "check_kernel_path", timeout=900)

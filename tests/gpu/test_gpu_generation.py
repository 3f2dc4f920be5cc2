"""Generation on the GPU (vpmoe/model/generate.py): the grouped-GEMM experts it runs there decode as
the reference loop does, in bf16, and a decode step stops syncing the host per expert; the decode
step captured as a CUDA graph gives the eager steps' tokens and makes no host sync."""
import traceback
import warnings

import torch

from tests.gpu.helpers import DEV, rel_err, small_cfg
from vpmoe.model import generate as G
from vpmoe.model import kernels as K
from vpmoe.model import model as M
from vpmoe.model.model import VpMoE


def _model():
    torch.manual_seed(0)
    model = VpMoE(small_cfg(n_experts=256)).to(DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.bfloat16().eval()


def _host_syncs(fn) -> list[str]:
    """Host syncs `fn` makes, by torch's sync debug mode (a warning per sync): the Python stack that
    made each (its last frames; a warning from C++ comes from the calling Python frame), so a failure
    says where, also when that frame is inside torch."""
    torch.cuda.synchronize()
    stacks, inside = [], [False]

    def record(message, category, filename, lineno, file=None, line=None):
        # only while fn runs: switching the mode on warns by itself on torch 2.11 (found 2026-12-05)
        if inside[0] and "synchroniz" in str(message):
            stacks.append(f"{str(message)[:80]!r} at " + " <- ".join(
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                for f in reversed(traceback.extract_stack()[-9:-1])))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            inside[0] = True
            fn()
        finally:
            inside[0] = False
            torch.cuda.set_sync_debug_mode("default")
    return stacks


@torch.no_grad()
def test_generate_on_gpu_runs_grouped_experts_as_the_loop(monkeypatch):
    model = _model()
    moe = model.moe_layers()
    prompts = [list(range(100 + 7 * b, 140 + 9 * b)) for b in range(4)]
    monkeypatch.setattr(G, "CAPTURED_DECODE_ON", ())  # eager steps here: test_captured_decode_* below
    runs = {}
    for grouped in (False, True):
        monkeypatch.setattr(G, "GROUPED_EXPERTS_ON", ("cuda",) if grouped else ())
        runs[grouped] = G.generate(model, prompts, max_new_tokens=8, stop_ids=(), pad_id=0)
        assert all(m.dispatcher is M.experts_loop for m in moe)  # put back
    # bf16 greedy with random weights: logits ~0.05 apart by a few ulps, so a first token may part
    # at a near-tie; each grouped first token is the loop's argmax to within 2% of the logits' scale
    for p, first in zip(prompts, (r[0] for r in runs[True])):
        loop = model(torch.tensor([p], device=DEV)).logits[0, -1].float()
        assert loop[first] >= loop.max() - 2e-2 * loop.abs().max(), (p, first, int(loop.argmax()))
    ids = torch.tensor([prompts[0] + runs[False][0]], device=DEV)
    ref = model(ids).logits.float()
    model.set_impl(moe=K.experts_grouped)
    assert rel_err(model(ids).logits, ref) < 2e-2

    cache = model.new_cache(1)
    model(ids[:, :-1], cache=cache)

    def step():
        return model(ids[:, -1:], cache=cache)
    grouped_syncs = len(_host_syncs(step))
    model.set_impl(moe=M.experts_loop)
    cache = model.new_cache(1)
    model(ids[:, :-1], cache=cache)
    loop_syncs = len(_host_syncs(step))
    print(f"host syncs per decode step: loop {loop_syncs}, grouped {grouped_syncs}")
    # the loop's `nonzero` per expert and layer; the grouped path none per expert
    n_experts = model.cfg.n_experts
    assert loop_syncs >= n_experts * len(moe) and grouped_syncs <= 2 * len(model.layers), (loop_syncs, grouped_syncs)


@torch.no_grad()
def test_captured_decode_gives_the_eager_steps_tokens(monkeypatch):
    """`generate` with its decode step captured (`CapturedDecode`, the default on CUDA) against the
    same fixed-shape cache stepped eagerly (the capture made to fail: the fallback path): the same
    kernels on the same shapes, so the same tokens exactly, greedy and sampled, with left-padded
    prompts longer than the window. No capture warning. A replay makes no host sync."""
    model = _model()
    prompts = [list(range(100 + 7 * b, 300 + 9 * b)) for b in range(4)]
    runs = {}
    for captured in (True, False):
        if not captured:
            def refuse(*args):
                raise RuntimeError("capture refused by the test")
            monkeypatch.setattr(G, "CapturedDecode", refuse)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[captured] = [G.generate(model, prompts, max_new_tokens=24, stop_ids=(), pad_id=0),
                              G.generate(model, prompts, max_new_tokens=24, stop_ids=(), pad_id=0,
                                         temperature=0.9, top_p=0.9, seed=3)]
        assert any("could not be captured" in str(w.message) for w in caught) == (not captured)
    assert runs[True] == runs[False]
    monkeypatch.undo()
    cache = G.StaticKVCache(model.cfg, 4, 64, torch.device(DEV))
    ids = torch.tensor([p[:40] for p in prompts], device=DEV)
    with G.grouped_experts(model, torch.device(DEV)):  # as `generate` runs it: the loop syncs per expert
        model(ids, cache=cache)
        model(ids[:, -1:], cache=cache)  # the eager warm-up step
        step = G.CapturedDecode(model, cache, ids[:, -1:])
        syncs = _host_syncs(lambda: step(ids[:, :1]))
    print(f"host syncs per captured decode step: {len(syncs)} {syncs}")
    assert not syncs and cache.seen == 43, syncs

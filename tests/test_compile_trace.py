"""The GPU path's compiled pieces trace as whole graphs (no graph breaks) on the CPU, so a CPU-side
edit that would break `torch.compile(fullgraph=True)` fails here instead of falling back (with a
warning) to a slow path on the GPU. `aot_eager` runs dynamo and AOTAutograd (forward and
backward graphs) without generating kernels; results are checked against the eager function.
FlexAttention is the one GPU-only piece (CPU blocks use the reference attention)."""
import pytest
import torch

from tests.test_model import randomize, small
from tests.test_train_helpers import synth_data  # noqa: F401
from vpmoe.model.fast import FastBody, make_block_fn
from vpmoe.model.model import VpMoE, alibi_slopes, positions_from_docs


@pytest.mark.parametrize("layer", [0, 1, 3], ids=["dense-local-first", "moe-local", "moe-global"])
def test_block_traces_whole_and_matches_eager(layer):
    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, n_experts=8, expert_ffn=8)
    model = randomize(VpMoE(cfg))
    params = FastBody._block_params(model.layers[layer])
    fn = make_block_fn(cfg, layer, torch.bfloat16, flex=False)  # GEMMs in bf16, as on the GPU
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.manual_seed(layer)
    B, T = 2, 20
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15])
    pos = positions_from_docs(doc)
    v_first = None if layer == 0 else torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim)
    slopes = alibi_slopes(cfg.n_heads) if cfg.is_global(layer) else None
    results = []
    for f in (fn, compiled):
        x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(7), requires_grad=True)
        for p in params.values():
            p.grad = None
        y, v, aux, load = f(params, x, pos, doc, v_first, None, slopes)
        assert (v is None) == (layer != 0)  # only the first layer's values are read again
        v = torch.zeros(()) if v is None else v
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + v.square().sum()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        results.append((y.detach(), v.detach(), x.grad.clone(), grads, load))
    (y0, v0, gx0, g0, l0), (y1, v1, gx1, g1, l1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 5
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    if l0 is not None:
        assert torch.equal(l1, l0)


@pytest.mark.parametrize("momentum", [torch.float32, torch.bfloat16])
def test_optimizer_kernels_trace_whole_and_match_eager(momentum):
    """FastMuonAdamW's compiled pieces (momentum + Nesterov + cast, both Newton-Schulz forms, the
    decayed update, the 2-D matrices' whole step) as whole graphs, equal to their eager selves."""
    from vpmoe.train.optim_fast import (_adamw_update, _muon_matrices, _muon_post, _muon_pre,
                                        gram_newton_schulz_packed, orthogonalise)

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(6, 16, 64, generator=gen)
    buf0 = torch.randn(6, 16, 64, generator=gen).to(momentum)
    coef, decay, step = torch.tensor(0.7), torch.tensor(0.999), torch.tensor(-0.01)
    outs = []
    for compiled in (False, True):
        pre, post, ns, packed, matrices, adamw = (
            (torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False) if compiled else f)
            for f in (_muon_pre, _muon_post, orthogonalise, gram_newton_schulz_packed, _muon_matrices,
                      _adamw_update))
        buf, w = buf0.clone(), torch.randn(6, 16, 64, generator=torch.Generator().manual_seed(12))
        u = pre(g, buf, coef, 0.95, True, torch.float32)
        o_gram, o_std = ns(u, 5, "gram"), ns(u, 5, "standard")
        post(w, o_gram, decay, step)
        w_kept, low = w.clone(), torch.empty(6, 16, 64, dtype=torch.bfloat16)  # with a kept bf16 copy
        post(w_kept, o_std, decay, step, low)
        assert torch.equal(low, w_kept.to(torch.bfloat16))
        o_packed = packed([u[:4], u[4:]], 5)
        # three 16 x 64 matrices (Gram-side) and two 24 x 24 (X-side), with and without decay
        mats = [torch.randn(*shape, generator=torch.Generator().manual_seed(13 + i))
                for i, shape in enumerate([(16, 64)] * 3 + [(24, 24)] * 2)]
        mat_bufs = [(torch.randn(m.shape, generator=torch.Generator().manual_seed(23 + i)) * 0.1).to(momentum)
                    for i, m in enumerate(mats)]
        for sl, d in ((slice(0, 3), decay), (slice(3, 5), None)):
            grads = [m * 0.5 + 0.1 for m in mats[sl]]
            matrices(mats[sl], grads, mat_bufs[sl], coef, 0.95, True, d, step, 5, "gram", torch.float32)
        aw, ag, am, av = (torch.randn(40, 24, generator=torch.Generator().manual_seed(31 + i)) for i in range(4))
        av = av.abs()
        adamw(aw, ag, am, av, torch.tensor(3.0), torch.tensor(2e-3), coef, 0.9, 0.95, 0.1, 1e-8)
        outs.append((buf, u, o_gram, o_std, w, w_kept, low, *o_packed, *mats, *mat_bufs, aw, am, av))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_checkpointed_compiled_blocks_stay_compiled_and_match():
    """FastBody(checkpoint=True) with compiled blocks: the backward's recomputation runs the
    compiled block again and must not be taken for a compile failure (non-reentrant checkpoint's
    early stop raises through the compiled call; on the GPU that once demoted every block to eager
    and then broke the recompute). Same hidden states and gradients as without checkpointing."""
    import copy

    torch._dynamo.reset()
    cfg = small(n_layers=4, d_model=32, n_experts=8, expert_ffn=8)
    plain = randomize(VpMoE(cfg))
    ckpt = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=gen)
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15])
    g = torch.randn(2, 20, cfg.d_model, generator=gen)
    outs = []
    for model, flag in ((plain, False), (ckpt, True)):
        body = FastBody(model, compile=True, checkpoint=flag, compile_backend="aot_eager",
                        dtype=torch.bfloat16)  # _grouped_mm traces in bf16 only
        for _ in range(2):  # the second step reuses the compiled graphs
            model.zero_grad(set_to_none=True)
            hidden, aux, _ = body(ids, doc)
            ((hidden * g).sum() + aux).backward()
        assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
        assert not any(f.failures for f in body.fns.values()), [f.failures for f in body.fns.values()]
        outs.append(hidden.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lean_saves_keep_less_for_backward_and_compute_the_same():
    """FastBody's partitioner option (`LEAN_SAVES`): AOTAutograd's min-cut partitioner (the one
    Inductor uses; `aot_eager_decomp_partition` runs it without generating kernels) may recompute
    in backward a cheap pointwise result the backward materialises anyway, instead of keeping it.
    The blocks then keep fewer bytes per token (at least the shared expert's activated copy, bf16
    [tokens, shared width]) and give the same hidden states and gradients."""
    import copy

    from bench.saved_activations import inventory

    cfg = small(n_layers=4, d_model=32, n_experts=8, expert_ffn=8)
    base = randomize(VpMoE(cfg))
    gen = torch.Generator().manual_seed(9)
    B, T = 2, 20
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    doc = torch.tensor([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15])
    g = torch.randn(B, T, cfg.d_model, generator=gen)
    kept, outs = {}, {}
    for lean in (False, True):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        body = FastBody(model, compile=True, compile_backend="aot_eager_decomp_partition",
                        dtype=torch.bfloat16, lean_saves=lean)
        _, kept[lean] = inventory(lambda: body(ids, doc), (), B, T, cfg.top_k, list(model.parameters()))
        model.zero_grad(set_to_none=True)
        hidden, aux, _ = body(ids, doc)
        ((hidden * g).sum() + aux).backward()
        assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
        outs[lean] = (hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.n_layers))
    assert n_moe >= 2 and kept[True] <= kept[False] - 2 * cfg.shared_ffn * n_moe, kept
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=0, atol=0)
    assert outs[True][1].keys() == outs[False][1].keys()
    for n, gr in outs[False][1].items():
        torch.testing.assert_close(outs[True][1][n], gr, rtol=1e-6, atol=1e-7, msg=n)


def test_lean_saves_with_checkpointed_blocks_partition_each_kind_its_way():
    """With the first blocks checkpointed, those compile without the lean option and the later
    ones with it, though every block function of a kind shares one code object: a graph that a
    checkpointed block compiled first must not serve a lean block of the same kind (it did once,
    and the option then did nothing for the blocks that keep their activations). Counted at the
    partitioner: one partition per (kind, lean), the embedding and the final norm, each under its own
    option."""
    import copy

    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from vpmoe.model.fast import LEAN_SAVES

    (option, lean_value), = LEAN_SAVES.items()
    seen = []

    def partition(*args, **kwargs):
        seen.append(getattr(functorch_config, option) == lean_value)
        return min_cut_rematerialization_partition(*args, **kwargs)

    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition)
    cfg = small(n_layers=4, d_model=32, n_experts=8, expert_ffn=8)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    doc = torch.zeros(2, 20, dtype=torch.long)
    torch._dynamo.reset()
    model = randomize(VpMoE(cfg))
    body = FastBody(copy.deepcopy(model), compile=True, compile_backend=backend, dtype=torch.bfloat16,
                    lean_saves=True, checkpoint=2)
    assert [k[3] for k in body.kind_of] == [False, False, True, True], body.kind_of
    assert body.kind_of[1][:3] == body.kind_of[2][:3]  # one kind on both sides of the split
    hidden, aux, _ = body(ids, doc)  # the checkpointed blocks compile first, as in training
    (hidden.float().sum() + aux).backward()
    assert set(body.compile_modes().values()) == {"fullgraph"}, body.compile_modes()
    n_lean = len({k for k in body.kind_of if k[3]})
    n_default = len({k for k in body.kind_of if not k[3]}) + 2  # + the embedding and the final norm
    assert sorted(seen) == [False] * n_default + [True] * n_lean, seen


def test_trainer_passes_lean_saves_to_the_fused_body(tmp_path, synth_data):  # noqa: F811
    """`train.lean_saves` reaches the fused body the trainer builds: the blocks after the
    checkpointed ones compile with the partitioner option, the checkpointed ones without; the run's
    compute summary says so."""
    from tests.test_train_helpers import TEST_MODEL, TEST_RUN
    from vpmoe.train.config import load_run_config
    from vpmoe.train.trainer import Trainer

    text = TEST_MODEL + TEST_RUN.format(data=synth_data, run_dir=tmp_path / "run", steps=1)
    text = text.replace("[train]\n", '[train]\nfast_path = "on"\nlean_saves = true\nactivation_checkpointing = 1\n')
    (tmp_path / "run.toml").write_text(text)
    tr = Trainer(load_run_config(tmp_path / "run.toml"))
    lean = [bool(tr.body.fns[k].partitioner) for k in tr.body.kind_of]
    assert lean == [False] + [True] * (len(lean) - 1) and len(lean) >= 2, lean
    assert "lean saves" in tr.compute_summary()
    # where it cannot apply (no fused body), the run says so instead of ignoring it silently
    (tmp_path / "off.toml").write_text(text.replace('fast_path = "on"', 'fast_path = "off"'))
    with pytest.warns(UserWarning, match="train.lean_saves"):
        off = Trainer(load_run_config(tmp_path / "off.toml"))
    assert off.body is None and "lean saves" not in off.compute_summary()
    (tmp_path / "all.toml").write_text(text.replace("activation_checkpointing = 1", "activation_checkpointing = true"))
    with pytest.warns(UserWarning, match="every block is checkpointed"):
        every = Trainer(load_run_config(tmp_path / "all.toml"))
    assert every.body.lean_blocks() == 0 and "lean saves" not in every.compute_summary()

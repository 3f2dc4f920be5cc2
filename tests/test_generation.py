"""Sampling through the KV cache and the HF adapter's generation paths, each against an independent
computation (one full forward of the real tokens, greedy decoding by hand, a plain cross-entropy),
float64 where numbers are compared:
- padding inside the cache (a right-padded prefill; a padded chunk appended to a cache) keeps every
  key a later query can see: decoding after it equals the full forward of the real tokens, with
  contexts longer than the local window;
- global layers append in place (spare slots, grown when full, new after a beam reorder), decoding
  across growths as the full forward;
- `generate()` applies the output head to the prompt's last position only;
- `sample()`: top_p = 0 and a vanishing temperature are greedy, never NaN;
- HF: the labels' loss in eval mode is the cross-entropy alone; beam search without a cache runs and
  equals beam search with it; a cache returned by `generate` continues a conversation exactly as a
  fresh `generate` over the whole sequence; a manual loop passing HF's past + new mask works."""
import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.model.generate import generate, sample
from vpmoe.model.hf import CACHE_KEY, to_hf
from vpmoe.model.model import KVCache, VpMoE


def _model(seed: int = 3) -> VpMoE:
    cfg = small(n_layers=4, window=5, vocab_size=97, max_seq_len=128)
    return randomize(VpMoE(cfg), seed=seed).double().eval()


def _last_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0, -1]


@torch.no_grad()
def test_padding_inside_the_cache_keeps_the_keys_later_queries_see():
    model = _model()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(1, 97, (2, 12), generator=g)
    decode = torch.randint(1, 97, (6,), generator=g).tolist()
    # (a) a right-padded prefill: row 0 has 4 real tokens then 8 pads, row 1 has 12 real tokens
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 4:] = 0
    cache = model.new_cache(2)
    model(real, cache=cache, attention_mask=mask)
    rows = [real[0, :4].tolist(), real[1].tolist()]
    for t in decode:
        got = model(torch.tensor([[t], [t]]), cache=cache).logits[:, -1]
        rows = [r + [t] for r in rows]
        for b in range(2):
            torch.testing.assert_close(got[b], _last_logits(model, rows[b]), rtol=0, atol=1e-9)
    assert cache.inner_pad
    # (b) a padded chunk appended to a cache (a batched continuation: 7 pads then 3 real tokens in row 0)
    cache = model.new_cache(2)
    model(real, cache=cache)
    chunk = torch.randint(1, 97, (2, 10), generator=g)
    cmask = torch.ones(2, 10, dtype=torch.long)
    cmask[0, :7] = 0
    model(chunk, cache=cache, attention_mask=cmask)
    rows = [real[0].tolist() + chunk[0, 7:].tolist(), real[1].tolist() + chunk[1].tolist()]
    for t in decode:
        got = model(torch.tensor([[t], [t]]), cache=cache).logits[:, -1]
        rows = [r + [t] for r in rows]
        for b in range(2):
            torch.testing.assert_close(got[b], _last_logits(model, rows[b]), rtol=0, atol=1e-9)
    # left padding only (batched generation): the cache keeps exactly the window on local layers
    cache = model.new_cache(2)
    model(real, cache=cache, attention_mask=torch.cat([torch.zeros(2, 3, dtype=torch.long),
                                                       torch.ones(2, 9, dtype=torch.long)], 1))
    assert not cache.inner_pad
    local = [e for i, e in enumerate(cache.layers) if not model.cfg.is_global(i)]
    assert local and all(e[0].shape[2] == model.cfg.window for e in local)


@torch.no_grad()
def test_global_layers_append_in_place_and_grow(monkeypatch):
    """Global layers write each step's entries into spare slots (a decode step copies only its own
    entries): within the buffers' capacity the cached keys stay in the same storage, they grow by
    `GROW` slots when full, and decoding across growths, a beam reorder and a step under autograd
    (appended by concatenation) equals the full forward of the tokens (float64)."""
    monkeypatch.setattr(KVCache, "GROW", 3)
    model = _model(seed=7)
    layer = next(i for i in range(model.cfg.n_layers) if model.cfg.is_global(i))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 97, (2, 5), generator=g).tolist()
    cache = model.new_cache(2)
    model(torch.tensor(rows), cache=cache)
    storages, sizes = [], []
    for step in range(8):
        t = torch.randint(1, 97, (2,), generator=g).tolist()
        got = model(torch.tensor([[x] for x in t]), cache=cache).logits[:, -1]
        rows = [r + [x] for r, x in zip(rows, t)]
        for b in range(2):
            torch.testing.assert_close(got[b], _last_logits(model, rows[b]), rtol=0, atol=1e-9)
        k = cache.layers[layer][0]
        assert k.shape[2] == len(rows[0]) and k.data_ptr() == cache._buffers[layer][0].data_ptr()
        storages.append(k.data_ptr())
        sizes.append(cache._buffers[layer][0].shape[2])
    # 5 prefilled + 3 spare = 8 slots, then 9 + 3 = 12, then 13 + 3 = 16
    assert sizes == [8, 8, 8, 12, 12, 12, 12, 16], sizes
    assert len(set(storages[:3])) == 1 and len(set(storages[3:7])) == 1 and storages[2] != storages[3]
    cache.reorder(torch.tensor([1, 0]))  # then a step under autograd (cat), then in place again
    rows = [rows[1], rows[0]]
    for t, grad in (([11, 12], False), ([13, 14], True), ([15, 16], False)):
        with torch.set_grad_enabled(grad):
            got = model(torch.tensor([[x] for x in t]), cache=cache).logits[:, -1]
        assert cache.layers[layer][0].requires_grad == grad
        rows = [r + [x] for r, x in zip(rows, t)]
        for b in range(2):
            torch.testing.assert_close(got[b], _last_logits(model, rows[b]), rtol=0, atol=1e-9)


@torch.no_grad()
def test_generate_applies_the_head_to_the_last_prompt_position_only():
    model = _model()
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    out = generate(model, prompts, max_new_tokens=4, stop_ids=(), pad_id=0)
    assert all(len(o) == 4 for o in out)
    assert shapes and all(s == (2, 97) or s == (2, 1, 97) for s in shapes), shapes
    for p, o in zip(prompts, out):  # greedy by hand: each next token the argmax of a full forward
        seq = list(p)
        for t in o:
            assert t == int(_last_logits(model, seq).argmax())
            seq.append(t)


def test_sample_edges_are_greedy_and_finite():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 30
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, 1.0, 0.0, g), greedy)
    for t in (1e-6, 1e-40):
        assert torch.equal(sample(logits, t, 1.0, g), greedy)


@torch.no_grad()
def test_hf_loss_beams_cache_reuse_and_manual_loop():
    hf = to_hf(_model()).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 9), generator=g)
    out = hf(ids, labels=ids, use_cache=False)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert float(hf.model(ids).aux_loss) > 0
    torch.testing.assert_close(out.loss, ce, rtol=0, atol=1e-12)
    hf.train()
    torch.testing.assert_close(hf(ids, labels=ids).loss, ce + hf.model(ids).aux_loss, rtol=0, atol=1e-12)
    hf.eval()
    common = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, "max_new_tokens": 6, "min_new_tokens": 6}
    beams = [hf.generate(ids[:1], num_beams=3, use_cache=c, **common) for c in (True, False)]
    assert torch.equal(*beams)
    first = hf.generate(ids[:1], return_dict_in_generate=True, **common)
    cache = getattr(first, CACHE_KEY, None) or first.past_key_values
    turn2 = torch.cat([first.sequences, torch.randint(1, 97, (1, 4), generator=g)], 1)
    again = hf.generate(turn2, attention_mask=torch.ones_like(turn2), **{CACHE_KEY: cache}, **common)
    assert torch.equal(again, hf.generate(turn2, attention_mask=torch.ones_like(turn2), **common))
    # a manual loop with HF's convention: the mask covers the past and the new token
    mask = torch.ones(1, 9, dtype=torch.long)
    step = hf(ids[:1], attention_mask=mask, use_cache=True)
    nxt = step.logits[:, -1].argmax(-1, keepdim=True)
    follow = hf(nxt, attention_mask=torch.ones(1, 10, dtype=torch.long), **{CACHE_KEY: getattr(step, CACHE_KEY)})
    torch.testing.assert_close(follow.logits[0, -1], _last_logits(hf.model, ids[0].tolist() + [int(nxt)]),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("top_p", [0.0, 0.3])
def test_generate_with_nucleus_is_reproducible(top_p):
    model = _model()
    runs = [generate(model, [[5, 6, 7], [8]], max_new_tokens=5, stop_ids=(), temperature=0.8, top_p=top_p, seed=4,
                     pad_id=0)
            for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 5 for r in runs[0])


@torch.no_grad()
def test_grouped_experts_decode_as_the_loop_and_the_swap_is_undone(monkeypatch):
    """`generate()` and the HF adapter's forward on a GPU run the grouped-GEMM dispatcher (the
    reference loop syncs the host per expert and layer). Here the CPU is made such a device: the
    tokens and float64 logits equal the loop's, both paths really swap (a spy dispatcher counts
    the grouped calls), the swap covers only the layers on the loop, and it is undone after, an
    error included. Off that device list nothing is swapped."""
    from vpmoe.model import generate as G
    from vpmoe.model import kernels as K
    from vpmoe.model import model as M

    model = _model(seed=5)
    moe = model.moe_layers()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14]]
    tokens = generate(model, prompts, max_new_tokens=6, stop_ids=(), pad_id=0)  # the loop
    ids = torch.tensor([prompts[0] + tokens[0]])
    loop_logits = model(ids).logits
    calls, grouped = [], K.experts_grouped
    def spy(*args):
        calls.append(1)
        return grouped(*args)
    monkeypatch.setattr(K, "experts_grouped", spy)
    monkeypatch.setattr(G, "GROUPED_EXPERTS_ON", ("cpu",))
    assert generate(model, prompts, max_new_tokens=6, stop_ids=(), pad_id=0) == tokens
    assert len(calls) == 6 * len(moe)  # prefill + 5 decode steps (none after the last token), every MoE layer
    hf = to_hf(model)
    torch.testing.assert_close(hf(ids).logits, loop_logits, rtol=1e-10, atol=1e-10)
    assert len(calls) == 7 * len(moe)
    assert all(m.dispatcher is M.experts_loop for m in moe)

    def other(*args):  # e.g. expert parallelism's dispatcher: never replaced
        raise AssertionError
    moe[0].dispatcher = other
    cpu = torch.device("cpu")
    with G.grouped_experts(model, cpu):
        assert [m.dispatcher for m in moe] == [other] + [spy] * (len(moe) - 1)
    assert [m.dispatcher for m in moe] == [other] + [M.experts_loop] * (len(moe) - 1)
    with pytest.raises(RuntimeError, match="mid-generation"), G.grouped_experts(model, cpu):
        raise RuntimeError("mid-generation")
    assert [m.dispatcher for m in moe[1:]] == [M.experts_loop] * (len(moe) - 1)
    monkeypatch.setattr(G, "GROUPED_EXPERTS_ON", ("cuda",))
    with G.grouped_experts(model, cpu):
        assert all(m.dispatcher is M.experts_loop for m in moe[1:])


def test_sampling_through_a_cache_skips_the_balance_statistics():
    """An eval-mode forward through a cache returns the same logits with no aux loss and no expert
    loads (nothing reads them while sampling); without a cache, or in train mode, they are there."""
    model = _model()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        cached = model(ids, cache=cache)
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-12)
    assert float(full.aux_loss) > 0 and full.expert_load.shape == (model.cfg.n_moe_layers, model.cfg.n_experts)
    assert float(cached.aux_loss) == 0 and cached.expert_load.shape == (0, model.cfg.n_experts)
    model.train()
    with torch.no_grad():
        trained = model(ids, cache=model.new_cache(2))
    torch.testing.assert_close(trained.aux_loss, full.aux_loss, rtol=0, atol=1e-12)
    assert torch.equal(trained.expert_load, full.expert_load)

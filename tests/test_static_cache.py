"""The fixed-shape KV cache that a captured decode step needs (`generate.StaticKVCache`), on the CPU
in float64, against full forwards of the real tokens (the independent reference) and the growing
`KVCache`: left-padded prompts longer than the local window (its ring wraps), one-token steps, a
longer chunk after decoding, stops, the capacity limit, and the fallback when a step cannot be
captured. The captured step itself: tests/gpu/test_gpu_generation.py."""
import pytest
import torch

from tests.test_model import randomize, small
from vpmoe.model import generate as G
from vpmoe.model.model import VpMoE


def _model(seed: int = 3) -> VpMoE:
    cfg = small(n_layers=4, window=5, vocab_size=97, max_seq_len=128)
    return randomize(VpMoE(cfg), seed=seed).double().eval()


def _last_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0, -1]


def _left_padded(prompts: list[list[int]], pad: int = 0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def test_static_cache_steps_and_chunks_match_full_forwards():
    """Prefill of left-padded prompts (9 and 3 tokens, window 5), seven one-token steps (the local
    ring wraps), then a 3-token chunk and two more steps: each row's last logits equal a full
    forward of its real tokens (1e-9), and the buffers never change shape or address."""
    model = _model()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5]]
    ids, mask = _left_padded(prompts)
    cache = G.StaticKVCache(model.cfg, 2, ids.shape[1] + 12, torch.device("cpu"))
    logits = model(ids, cache=cache, attention_mask=mask).logits[:, -1]
    rows = [list(p) for p in prompts]
    addresses = [[t.data_ptr() for t in layer] for layer in cache.layers]
    assert [layer[0].shape[2] for layer in cache.layers] == [
        cache.capacity if model.cfg.is_global(i) else model.cfg.window for i in range(model.cfg.n_layers)]

    def check(got):
        for b in range(2):
            torch.testing.assert_close(got[b], _last_logits(model, rows[b]), rtol=0, atol=1e-9)
    check(logits)
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        n = 3 if step == 7 else 1
        new = torch.randint(1, 97, (2, n), generator=g)
        logits = model(new, cache=cache).logits[:, -1]
        rows = [r + t for r, t in zip(rows, new.tolist())]
        check(logits)
    assert [[t.data_ptr() for t in layer] for layer in cache.layers] == addresses
    assert cache.seen == ids.shape[1] + 12 and int(cache.count) == cache.seen


@torch.no_grad()
def test_static_cache_refuses_tokens_past_its_capacity():
    model = _model()
    cache = G.StaticKVCache(model.cfg, 1, 6, torch.device("cpu"))
    model(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
    with pytest.raises(ValueError, match="5 tokens \\+ 2 more exceed its capacity of 6"):
        model(torch.tensor([[6, 7]]), cache=cache)
    assert cache.seen == 5 and int(cache.count) == 5 and cache.next_pos.tolist() == [5]  # nothing moved
    model(torch.tensor([[6]]), cache=cache)
    with pytest.raises(NotImplementedError):
        cache.reorder(torch.tensor([0]))


@torch.no_grad()
@pytest.mark.parametrize("stop_rows", [False, True])
def test_generate_with_the_static_cache_is_greedy_decoding(stop_rows, monkeypatch):
    """`generate` on a device listed in CAPTURED_DECODE_ON (here the CPU: no graph, the fixed-shape
    cache) returns what the growing cache's path returns, and every token is the argmax of a full
    forward. With stops, the rows end at their stop token (kept), also when every row has stopped
    between two of the host's stop checks (`STOP_CHECK_EVERY` 4 here)."""
    model = _model(seed=6)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15, 16, 17, 18, 19]]
    want = G.generate(model, prompts, max_new_tokens=11, stop_ids=(), pad_id=0)
    stops = ()
    if stop_rows:  # each row stops at a token it decodes by step 3
        stops = tuple({row[min(i + 1, 2)] for i, row in enumerate(want)})
        cut = [next(j for j, t in enumerate(row) if t in stops) + 1 for row in want]
        want = [row[:c] for row, c in zip(want, cut)]
        assert max(cut) <= 3
    monkeypatch.setattr(G, "CAPTURED_DECODE_ON", ("cpu",))
    monkeypatch.setattr(G, "STOP_CHECK_EVERY", {"cpu": 4})
    made = []
    real = G.StaticKVCache
    monkeypatch.setattr(G, "StaticKVCache", lambda *a: made.append(real(*a)) or made[-1])
    got = G.generate(model, prompts, max_new_tokens=11, stop_ids=stops, pad_id=0)
    assert len(made) == 1 and made[0].capacity == 8 + 11
    assert got == want
    for p, o in zip(prompts, got):  # greedy by hand
        seq = list(p)
        for t in o:
            assert t == int(_last_logits(model, seq).argmax())
            seq.append(t)


@torch.no_grad()
def test_a_step_that_cannot_be_captured_runs_eagerly():
    """`_captured_or_eager` when the capture fails (no CUDA here): a warning, the host's token count
    as before the attempt, then the step run eagerly: its logits are the full forward's, and the
    eager step keeps serving."""
    model = _model()
    cache = G.StaticKVCache(model.cfg, 1, 10, torch.device("cpu"))
    model(torch.tensor([[4, 5, 6]]), cache=cache)
    eager = G._eager_step(model, cache)
    with pytest.warns(UserWarning, match="could not be captured"):
        step, logits = G._captured_or_eager(model, cache, torch.tensor([[7]]), eager)
    assert step is eager and cache.seen == 4 and int(cache.count) == 4
    torch.testing.assert_close(logits[0], _last_logits(model, [4, 5, 6, 7]), rtol=0, atol=1e-9)
    torch.testing.assert_close(step(torch.tensor([[8]]))[0], _last_logits(model, [4, 5, 6, 7, 8]), rtol=0, atol=1e-9)


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_prefill_in_chunks_is_greedy_decoding(static, monkeypatch):
    """A prompt prefilled in chunks through the cache (`PREFILL_TOKENS` 9 over 3 rows: chunks of 3
    tokens, the window 5; the short row's first chunks all padding) decodes what full forwards do,
    with the growing cache and the fixed-shape one; an all-empty batch is refused by name."""
    model = _model(seed=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [12, 13, 14, 15, 16, 17, 18]]
    monkeypatch.setattr(G, "CAPTURED_DECODE_ON", ("cpu",) if static else ())
    monkeypatch.setattr(G, "PREFILL_TOKENS", 9)
    forwards = []
    hook = model.layers[0].register_forward_hook(lambda mod, inp, out: forwards.append(inp[0].shape[1]))
    got = G.generate(model, prompts, max_new_tokens=5, stop_ids=(), pad_id=0)
    hook.remove()
    assert forwards[:4] == [3, 3, 3, 2] and forwards[4:] == [1] * 4
    for p, o in zip(prompts, got):
        seq = list(p)
        for t in o:
            assert t == int(_last_logits(model, seq).argmax())
            seq.append(t)
    with pytest.raises(ValueError, match="every prompt is empty"):
        G.generate(model, [[], []], max_new_tokens=2)

"""Router, aux loss, bias update, float64 gradients, KV cache and the HF adapter (issue A)."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from vpmoe.config import ConfigError, ModelConfig, from_dict, load_model_config
from vpmoe.model.model import MoE, VpMoE, route_reference, sequence_aux_loss
from tests.test_model import randomize, small


def test_router_selects_inside_top_groups_and_weights_use_unbiased_scores():
    cfg = small(n_experts=32, n_groups=8, topk_groups=4, top_k=4)
    torch.manual_seed(0)
    N = 64
    x = torch.randn(N, cfg.d_model, dtype=torch.float64)
    w = torch.randn(cfg.n_experts, cfg.d_model, dtype=torch.float64)
    bias = torch.randn(cfg.n_experts, dtype=torch.float64) * 0.5
    idx, weight, scores = route_reference(x, w, bias, cfg)
    s = torch.sigmoid(x @ w.T)
    torch.testing.assert_close(scores, s)
    per = cfg.n_experts // cfg.n_groups
    for n in range(N):
        biased = (s[n] + bias).view(cfg.n_groups, per)
        group_score = biased.topk(cfg.top_k // cfg.topk_groups, -1).values.sum(-1)  # = the group's top-1 here
        top_groups = set(group_score.topk(cfg.topk_groups).indices.tolist())
        chosen = idx[n].tolist()
        assert {e // per for e in chosen} <= top_groups
        # the chosen experts are the best biased scores among the kept groups' experts
        candidates = sorted((float(s[n, e] + bias[e]), e) for e in range(cfg.n_experts) if e // per in top_groups)
        assert set(chosen) == {e for _, e in candidates[-cfg.top_k:]}
        unbiased = s[n, idx[n]]
        torch.testing.assert_close(weight[n], unbiased / unbiased.sum() * 2.5)
    torch.testing.assert_close(weight.sum(-1), torch.full((N,), 2.5, dtype=torch.float64))


def test_bias_has_no_gradient_and_moves_by_update_rule():
    cfg = small()
    model = randomize(VpMoE(cfg))
    moe = model.moe_layers()[0]
    assert "expert_bias" not in dict(model.named_parameters()) and not moe.expert_bias.requires_grad
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.expert_bias.grad is None
    # hand computation of b += rate * sign(mean_load - load)
    load = torch.tensor([[5, 0, 3, 3, 1, 9, 3, 0]] * cfg.n_moe_layers)
    before = [m.expert_bias.clone() for m in model.moe_layers()]
    model.update_router_biases(load)
    step = 1e-3 * torch.tensor([-1.0, 1, 0, 0, 1, -1, 0, 1])  # mean load 3
    for m, b in zip(model.moe_layers(), before):
        torch.testing.assert_close(m.expert_bias, b + step)
    # the forward reports loads that sum to tokens * top_k per layer
    assert out.expert_load.shape == (cfg.n_moe_layers, cfg.n_experts)
    assert out.expert_load.sum(-1).tolist() == [24 * cfg.top_k] * cfg.n_moe_layers


def test_sequence_aux_loss_hand_computation():
    cfg = small(n_experts=4, n_groups=2, topk_groups=1, top_k=1)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.6, 0.1, 0.1], [0.3, 0.3, 0.3, 0.9]], dtype=torch.float64)
    idx = torch.tensor([[0], [1], [3]])
    # one row of T=3 tokens: f_e = E/(k*T) * count_e; P_e = mean_t s_te / sum_e s_te
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    f = torch.tensor([1.0, 1, 0, 1], dtype=torch.float64) * 4 / 3
    torch.testing.assert_close(sequence_aux_loss(scores, idx, 1, cfg), (f * p).sum())


def test_moe_layer_equals_dense_per_token_computation():
    cfg = small()
    moe = randomize(MoE(cfg)).double()
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64)
    y, _, _ = moe(x)
    idx, w, _ = route_reference(x.view(10, -1), moe.router.weight, moe.expert_bias, cfg)
    for n in range(10):
        xn = x.view(10, -1)[n]
        want = moe.shared(xn)
        for slot in range(cfg.top_k):
            e = idx[n, slot]
            h = torch.relu(xn @ moe.w_up[e] + moe.b_up[e]) ** 2
            want = want + w[n, slot] * (h @ moe.w_down[e] + moe.b_down[e])
        torch.testing.assert_close(y.view(10, -1)[n], want)


def test_float64_gradcheck_tiny_model():
    cfg = small(n_layers=4, d_model=16, head_dim=4, n_heads=2, n_kv_heads=1, expert_ffn=4, shared_ffn=8,
                dense_ffn=8, vocab_size=31, window=3)
    model = randomize(VpMoE(cfg)).double()
    ids = torch.randint(0, 31, (1, 7))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    names = ["layers.0.attn.a_q.weight", "layers.1.ffn.w_up", "layers.3.attn.wq.weight",
             "layers.2.attn.log_freq", "layers.2.attn.sinks", "layers.3.attn.value_mix", "layers.1.ffn.router.weight"]
    params = dict(model.named_parameters())
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]

    def f(*tensors):
        state = {n: t for n, t in zip(names, tensors)}
        out = torch.func.functional_call(model, state, (ids,), {"doc_ids": doc})
        return out.logits.sum(-1) + out.aux_loss * 1e3

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prefill", [1, 7, 40])
def test_kv_cache_decoding_equals_full_forward(prefill):
    cfg = small(window=6)
    model = randomize(VpMoE(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        steps = [model(ids[:, :prefill], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, 45)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    for layer, entry in enumerate(cache.layers):  # local layers keep only the window
        assert entry[0].shape[2] == (45 if cfg.is_global(layer) else cfg.window)


def test_kv_cache_left_padding_matches_unpadded_rows():
    cfg = small(window=4)
    model = randomize(VpMoE(cfg)).eval()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    pad = torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)
    batch = torch.cat([a, pad]), torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    nxt = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        cache = model.new_cache(2)
        out = [model(batch[0], cache=cache, attention_mask=batch[1]).logits[:, -1:]]
        out += [model(nxt[:, t:t + 1], cache=cache).logits for t in range(6)]
        got = torch.cat(out, 1)
        want_a = model(torch.cat([a, nxt[:1]], 1)).logits[:, 8:]
        want_b = model(torch.cat([b, nxt[1:]], 1)).logits[:, 4:]
    torch.testing.assert_close(got[0], want_a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want_b[0], rtol=1e-4, atol=1e-5)


def test_hf_round_trip_generate_and_auto_loading(tmp_path):
    from vpmoe.model.hf import VpMoEConfig, VpMoEForCausalLM

    cfg = small()
    hf = VpMoEForCausalLM(VpMoEConfig.from_model_config(cfg))
    randomize(hf)
    with torch.no_grad():
        for m in hf.model.moe_layers():
            m.expert_bias.normal_()  # buffers must round-trip too
    hf.eval().save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        want = hf(ids).logits
    # a fresh interpreter: `import vpmoe` alone must make AutoModelForCausalLM know the type
    code = (f"import torch, vpmoe\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
            f"ids = torch.tensor({ids.tolist()})\n"
            f"with torch.no_grad(): torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
            f"print(type(m).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "VpMoEForCausalLM" in res.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)  # bit-exact round trip
    assert VpMoEConfig.from_pretrained(tmp_path).to_model_config() == cfg
    # generate() with the cache equals greedy decoding by full forwards
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, hf(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("override,field", [
    ({"top_k": 9, "n_experts": 8, "n_groups": 4, "topk_groups": 2}, "top_k"),
    ({"n_heads": 6, "n_kv_heads": 4}, "n_kv_heads"),
    ({"window": 0}, "window"),
    ({"n_experts": 10, "n_groups": 4}, "n_groups"),
    ({"topk_groups": 9, "n_groups": 8}, "topk_groups"),
])
def test_bad_config_values_name_the_field(override, field):
    data = dataclasses.asdict(load_model_config("configs/tiny.toml"))
    data.update(override)
    with pytest.raises(ConfigError, match=rf"model\.{field}"):
        from_dict(ModelConfig, data, "model")


def test_unknown_and_ill_typed_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(open("configs/tiny.toml").read().replace("window = 16", "windw = 16"))
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key model\.windw"):
        load_model_config(bad)
    bad.write_text(open("configs/tiny.toml").read().replace("window = 16", 'window = "16"'))
    with pytest.raises(ConfigError, match=r"model\.window: expected an integer"):
        load_model_config(bad)
    res = subprocess.run([sys.executable, "-m", "vpmoe.cli", "params", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "model.window" in res.stderr and "Traceback" not in res.stderr


def test_params_cli_matches_reference_budget_and_allocated_model():
    res = subprocess.run([sys.executable, "-m", "vpmoe.cli", "params", "configs/vpmoe.toml", "--json"],
                         capture_output=True, text=True, timeout=60)
    counts = json.loads(res.stdout)
    assert abs(counts["total"] / 6.02e9 - 1) < 0.02
    assert abs(counts["active"] / 780e6 - 1) < 0.03
    assert abs(counts["active_non_embedding"] / 368e6 - 1) < 0.05
    # on a small config, the meta-device count equals a real model's allocated parameters
    from vpmoe.model.params import count_params
    cfg = small()
    real = VpMoE(cfg)
    c = count_params(cfg)
    assert c["total"] == sum(p.numel() for p in real.parameters())
    routed = sum(m.w_up.numel() + m.b_up.numel() + m.w_down.numel() + m.b_down.numel() for m in real.moe_layers())
    assert c["active"] == c["total"] - routed + routed * cfg.top_k // cfg.n_experts


@pytest.mark.parametrize("order", ["vpmoe first", "transformers first"])
def test_auto_classes_know_vpmoe_whatever_the_import_order(order):
    first, second = ("import vpmoe", "import transformers") if order == "vpmoe first" else ("import transformers", "import vpmoe")
    code = (f"{first}\n{second}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "from vpmoe.model.hf import VpMoEForCausalLM\n"
            "cfg = AutoConfig.for_model('vpmoe', n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,"
            " vocab_size=300, n_experts=8, n_groups=4, topk_groups=2, num_experts_per_tok=2)\n"
            "assert isinstance(AutoModelForCausalLM.from_config(cfg), VpMoEForCausalLM)\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_a_bad_command_line_override_is_named_as_one():
    """`--set` keys are attributed to the command line, file keys to the file alone."""
    from vpmoe.train.config import load_run_config

    with pytest.raises(ConfigError, match=r"train_tiny.toml with --set train\.stpes: unknown key train\.stpes"):
        load_run_config("configs/train_tiny.toml", ["train.steps=2", "train.stpes=3"])
    with pytest.raises(ConfigError, match=r"with --set train\.steps: .*train\.steps"):
        load_run_config("configs/train_tiny.toml", ["train.steps='many'"])
    assert load_run_config("configs/train_tiny.toml", ["train.steps=2"]).train.steps == 2

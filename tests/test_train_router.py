"""One optimizer step of the trainer (2 micro-batches) against a hand computation on the whole
batch at once: span-normalised loss, sequence aux loss, router-bias update, grad norm and the
updated weights (same optimizer fed the full-batch gradient)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.test_train_helpers import synth_data, write_config  # noqa: F401


@pytest.fixture()
def trainer(synth_data, tmp_path):  # noqa: F811
    from vpmoe.train.config import load_run_config
    from vpmoe.train.trainer import Trainer

    cfg_path = write_config(tmp_path / "run.toml", synth_data, tmp_path / "run", steps=4)
    # w_f != w_r and a visible aux coefficient, so a wrong weighting cannot cancel out
    cfg = load_run_config(cfg_path, ["train.w_final=0.5", "model.aux_loss_coef=0.01", "optim.grad_clip=0.5"])
    return Trainer(cfg)


def hand_aux(model, batch) -> torch.Tensor:
    """coef * sum over MoE layers of mean over rows of sum_e f_e * P_e, from hooked router inputs."""
    from vpmoe.model.model import route_reference

    inputs = []
    hooks = [moe.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
             for moe in model.moe_layers()]
    with torch.no_grad():
        model(batch["tokens"], doc_ids=batch["doc_ids"], return_hidden=True)
    for h in hooks:
        h.remove()
    cfg = model.cfg
    total = 0.0
    for moe, x in zip(model.moe_layers(), inputs):
        B, T, _ = x.shape
        for row in range(B):
            idx, _, scores = route_reference(x[row], moe.router.weight, moe.expert_bias, cfg)
            s = scores.detach().double()
            row_loss = 0.0
            for e in range(cfg.n_experts):
                f = cfg.n_experts / (cfg.top_k * T) * float((idx == e).sum())
                p = float((s[:, e] / s.sum(1)).mean())
                row_loss += f * p
            total += row_loss / B
    return torch.tensor(cfg.aux_loss_coef * total, dtype=torch.float64)


def hand_loss(model, batch, w_r, w_f) -> torch.Tensor:
    """Materialised CE at supervised positions, mean per span over the whole batch."""
    out = model(batch["tokens"], doc_ids=batch["doc_ids"], return_hidden=True)
    span = batch["span_id"] * (batch["loss_mask"] != 0)
    sel = span.reshape(-1) > 0
    logits = out.hidden.reshape(-1, out.hidden.shape[-1])[sel] @ model.lm_head.weight.T
    nll = torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1)[sel], reduction="none")
    s = span.reshape(-1)[sel]
    return w_r * nll[s == 1].mean() + w_f * nll[s == 2].mean(), out.aux_loss, out.expert_load


def test_one_step_equals_full_batch_hand_computation(trainer):
    from vpmoe.train.optim import build_optimizer, set_lr
    from vpmoe.train.parallel import clip_grads, grad_norm
    from vpmoe.train.schedule import wsd_factor

    cfg = trainer.cfg
    model0 = copy.deepcopy(trainer.model)
    micro = [trainer.train_data.next() for _ in range(cfg.train.grad_accum)]
    counts = [tuple(int(((b["span_id"] == s) & (b["loss_mask"] != 0)).sum()) for s in (1, 2)) for b in micro]
    assert counts[0] != counts[1], "micro-batches with equal span counts would not test the global normalisation"
    full = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}

    report = trainer.train_step(micro)

    loss, aux, load = hand_loss(model0, full, cfg.train.w_reasoning, cfg.train.w_final)
    assert report["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    aux_by_hand = hand_aux(model0, full)
    assert float(aux_by_hand) > 0
    assert report["aux_loss"] == pytest.approx(float(aux_by_hand), rel=1e-5)
    assert report["aux_loss"] == pytest.approx(float(aux.detach()), rel=1e-6)

    # router biases: one update from the loads of both micro-batches together
    rate = cfg.model.bias_update_rate
    expected_bias = rate * torch.sign(load.float().mean(1, keepdim=True) - load.float())
    got_bias = torch.stack([m.expert_bias for m in trainer.model.moe_layers()])
    assert torch.equal(got_bias, expected_bias)

    # weights: the same optimizer step driven by the full-batch gradient
    (loss + aux).backward()
    opt = build_optimizer(model0, cfg.optim)
    set_lr(opt, wsd_factor(0, cfg.train.steps, cfg.schedule))
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = grad_norm(params)
    assert report["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert float(norm) > cfg.optim.grad_clip  # clipping is active in this step
    clip_grads(params, cfg.optim.grad_clip, norm)
    opt.step()
    got = dict(trainer.model.named_parameters())
    for name, p in model0.named_parameters():
        torch.testing.assert_close(got[name].detach(), p.detach(), rtol=1e-4, atol=1e-6, msg=name)

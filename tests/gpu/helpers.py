"""What several GPU test modules share: the device, the relative error they assert on, and the
small model config (dense, two local MoE and one global MoE layer) they build."""
import dataclasses

from vpmoe.config import load_model_config

DEV = "cuda"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small_cfg(**kw):
    base = {"n_layers": 4, "n_experts": 64, "vocab_size": 4096}  # layers: dense, local MoE x2, global MoE
    base.update(kw)
    return dataclasses.replace(load_model_config("configs/vpmoe.toml"), **base)

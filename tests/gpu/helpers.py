"""What several GPU test modules share: the device, the relative error they assert on, and the
small model config (dense, two local MoE and one global MoE layer) they build, and a way to run an
autotuned Triton kernel under each of its configs in turn."""
import contextlib
import dataclasses

from vpmoe.config import load_model_config

DEV = "cuda"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small_cfg(**kw):
    base = {"n_layers": 4, "n_experts": 64, "vocab_size": 4096}  # layers: dense, local MoE x2, global MoE
    base.update(kw)
    return dataclasses.replace(load_model_config("configs/vpmoe.toml"), **base)


@contextlib.contextmanager
def forced_config(tuner, config):
    """An autotuned kernel (`triton.autotune`'s Autotuner) limited to `config` inside the block (one
    config: no tuning, no pruning), its configs and tuning cache restored after: for tests that check
    every config the tuner may pick, not only the one it picked on this machine."""
    configs, cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [config]
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = configs
        tuner.cache.clear()
        tuner.cache.update(cache)

"""The vpMoE model: `model.py` is the readable reference; `params.py` counts parameters without
allocating them; `hf.py` adapts it to transformers (AutoConfig / AutoModelForCausalLM)."""
from vpmoe.model.model import KVCache, ModelOutput, MoE, VpMoE  # noqa: F401

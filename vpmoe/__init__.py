"""vpmoe: the system that trains vpMoE, an ultra-sparse MoE language model, by distillation.

`import vpmoe` registers the model with transformers' AutoConfig / AutoModelForCausalLM, so a
saved vpMoE directory loads with `AutoModelForCausalLM.from_pretrained(path)`.
"""
__version__ = "0.1.0"

from vpmoe.config import ModelConfig, load_model_config  # noqa: E402,F401


def _register_hf() -> None:
    try:
        from vpmoe.model.hf import register
    except ImportError:  # transformers missing: the core model still works
        return
    register()


_register_hf()

"""vpmoe: the system that trains vpMoE, an ultra-sparse MoE language model, by distillation.

`import vpmoe` makes transformers' AutoConfig / AutoModelForCausalLM know the `vpmoe` model type,
so a saved vpMoE directory loads with `AutoModelForCausalLM.from_pretrained(path)`.

Why the registration is deferred: importing transformers costs seconds, and most of the system
(data building workers, the trainer, `vpmoe params`) never needs it. So if transformers is
already imported we register at once; otherwise a one-shot import hook registers right after
transformers itself finishes importing, whoever imports it.
"""
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

from vpmoe.config import ModelConfig, load_model_config  # noqa: E402,F401


def _register_hf() -> None:
    partial = sys.modules.get("vpmoe.model.hf")
    if partial is not None and not hasattr(partial, "register"):
        return  # vpmoe.model.hf is importing transformers right now; it registers itself when done
    from vpmoe.model.hf import register
    register()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds nothing itself: it wraps the real loader of `transformers` to register afterwards."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also lets the real finders answer below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._real.exec_module(module)
        _register_hf()


if "transformers" in sys.modules:
    _register_hf()
elif importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _RegisterAfterTransformers())

"""transformers adapter: `VpMoEConfig` / `VpMoEForCausalLM`, registered with the Auto classes.

Design choices:
- The HF classes are a thin shell around `VpMoE`: the state dict is the model's own under
  `model.`, so our checkpoints, the HF directory and the trainer all share one set of names.
- `VpMoEConfig` carries exactly the `ModelConfig` fields (plus HF's own), so a saved
  `config.json` round-trips to the same `ModelConfig`.
- Generation uses our own `KVCache` (sliding-window layers keep only the window), passed through
  `past_key_values`; `prepare_inputs_for_generation` feeds only the new tokens. Left padding works
  through `attention_mask`.
- On a GPU the forward runs the routed experts as grouped GEMMs, not the reference loop that syncs
  the host per expert (`generate.grouped_experts`): eval and HF `generate` alike.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vpmoe.config import ModelConfig, from_dict
from vpmoe.model.generate import grouped_experts
from vpmoe.model.model import KVCache, VpMoE

# transformers renamed `past_key_values` to `cache` (5.2x); support both spellings
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
# ModelConfig names that HF reserves for other meanings (top_k is a generation flag)
HF_NAMES = {"top_k": "num_experts_per_tok"}


class VpMoEConfig(PretrainedConfig):
    model_type = "vpmoe"

    def __init__(self, **kwargs):
        defaults = dataclasses.asdict(ModelConfig())
        for name in MODEL_FIELDS:
            hf_name = HF_NAMES.get(name, name)
            setattr(self, hf_name, kwargs.pop(hf_name, defaults[name]))
        kwargs.setdefault("tie_word_embeddings", False)
        if self.vocab_size > 200012:  # full o200k ids (a vocab-subset model has compact ids: none set)
            kwargs.setdefault("eos_token_id", [200002, 199999, 200012])  # <|return|>, <|endoftext|>, <|call|>
            kwargs.setdefault("pad_token_id", 199999)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "VpMoEConfig":
        fields = {HF_NAMES.get(k, k): v for k, v in dataclasses.asdict(cfg).items()}
        return cls(**fields, **kwargs)

    def to_model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, {name: getattr(self, HF_NAMES.get(name, name)) for name in MODEL_FIELDS}, "model")

    # HF utilities read these names
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads


class VpMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = VpMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_cache_class = False
    _is_stateful = True  # our cache is not an HF Cache: no assisted decoding / cache conversion

    def __init__(self, config: VpMoEConfig):
        super().__init__(config)
        self.model = VpMoE(config.to_model_config())
        self.post_init()

    def _init_weights(self, module):  # VpMoE initialises itself in its constructor
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        model_kwargs.setdefault(CACHE_KEY, None)  # ours is created on the first forward

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            new = input_ids.shape[1] - cache.seen
            input_ids = input_ids[:, -new:]
            if attention_mask is not None:
                attention_mask = attention_mask[:, -new:]
        return {"input_ids": input_ids, CACHE_KEY: cache, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache", True), "logits_to_keep": kwargs.get("logits_to_keep", 0)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, doc_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0, cache: KVCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        vocab = self.config.vocab_size
        if vocab <= 200012 and input_ids.numel() and int(input_ids.max()) >= vocab:  # (a host read: subset models only)
            raise ValueError(f"input id {int(input_ids.max())} >= this model's vocab_size {vocab}: it was trained on a "
                             "vocabulary subset and reads compact ids; map o200k ids with "
                             "vpmoe.data.vocab_subset.VocabSubset.find(MODEL_DIR).to_compact(ids)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and attention_mask is not None and attention_mask.shape[1] > input_ids.shape[1]:
            attention_mask = attention_mask[:, -input_ids.shape[1]:]  # HF's convention: the mask covers past + new
        if cache is None and use_cache and not self.training:
            cache = self.model.new_cache(input_ids.shape[0])
        with grouped_experts(self.model, input_ids.device):  # on a GPU: no host sync per expert
            out = self.model(input_ids, doc_ids=doc_ids, cache=cache, attention_mask=attention_mask,
                             return_hidden=True)
        hidden = out.hidden[:, -logits_to_keep:] if logits_to_keep else out.hidden
        logits = self.model.lm_head(hidden)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift = shift.float() if shift.dtype in (torch.bfloat16, torch.float16) else shift  # (never narrowed)
            loss = torch.nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
            if self.training:  # the balance term belongs to a training objective, not to an evaluation's loss
                loss = loss + out.aux_loss
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})

    def _reorder_cache(self, past_key_values, beam_idx):
        if past_key_values is not None:  # (beam search without a cache)
            past_key_values.reorder(beam_idx)
        return past_key_values


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know model_type 'vpmoe' (idempotent)."""
    try:
        AutoConfig.register("vpmoe", VpMoEConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(VpMoEConfig, VpMoEForCausalLM)
    except ValueError:
        pass


register()  # importing this module is enough to make the Auto classes know vpmoe


def to_hf(model: VpMoE) -> VpMoEForCausalLM:
    """Wrap an existing VpMoE (sharing its weights) for save_pretrained / generate."""
    hf = VpMoEForCausalLM.__new__(VpMoEForCausalLM)
    PreTrainedModel.__init__(hf, VpMoEConfig.from_model_config(model.cfg))
    hf.model = model
    return hf

"""Turn MODEL (a path) into a model with the HF causal-LM interface plus its tokenizer.

Design choices:
- One interface for every model: `model(input_ids=...).logits` and `generate()`. A directory with a
  `config.json` is loaded with `AutoModelForCausalLM` after `import vpmoe` (which registers vpMoE),
  so our exports, a parent Qwen3 and a teacher all load the same way. A training checkpoint (no
  `config.json`) goes through `vpmoe.train.checkpoint.load_model_for_eval` when that module exists;
  otherwise the error says to run `vpmoe export` first.
- Tokenizer: an HF directory that ships tokenizer files uses `AutoTokenizer`; anything else uses
  o200k_harmony (`vpmoe.tokenizer`, offline). An HF tokenizer that encodes a fixed probe text and the
  Harmony special tokens exactly like o200k_harmony is declared o200k-compatible and gets the same
  tokenizer hash as our data manifests; any other tokenizer is fingerprinted by its files, so data
  built with o200k is refused for it.
- The model hash is a sha256 over the state dict (names, dtypes, shapes, bytes), so a training
  checkpoint and its HF export of the same weights hash the same.
- A model trained on a vocabulary subset (its directory holds `vocab_subset.json`) is wrapped in
  `SubsetCausalLM`: o200k ids in, full-vocabulary logits out (-inf outside the subset).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpmoe.cli import UserError
from vpmoe.config import ConfigError

# files that mean "this HF directory ships its own tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
HARMONY_SPECIALS = ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>")
# probe for o200k compatibility: words, casing, contractions, digits, code, whitespace runs, CJK, emoji
PROBE_TEXT = (
    "The quick brown fox can't jump 1234567 times; it's 3.14159 or -0.5e-3? Résumé naïve café.\n"
    "def f(x):\n    return x**2  # squared\n\n\t  spaces   and\r\nnewlines 2026-01-01 12:00:00 $1,234.56\n"
    "中文分词测试，日本語のテキスト、한국어 텍스트. Emoji 🙂👍🏽 and symbols ≤≥≠→ «quotes» «»\n"
    "URL https://example.com/a/b?c=d&e=f email a.b@c.de ALLCAPS CamelCaseWord snake_case_word"
)


@dataclass
class EvalTokenizer:
    """What the eval needs from a tokenizer: encode/decode, the end-of-text id, and identity."""

    name: str
    sha256: str
    eos_id: int
    o200k_compatible: bool
    prefix_id: int | None = None  # conditions a continuation with no context (lm-eval: BOS, else EOS)
    _encode: object = field(repr=False, default=None)
    _encode_ordinary: object = field(repr=False, default=None)
    _decode: object = field(repr=False, default=None)
    hf: object = field(repr=False, default=None)  # the transformers tokenizer, when there is one

    def encode(self, text: str) -> list[int]:
        """Text as a scorer sees it: the tokenizer's default special tokens (an HF BOS) included,
        exactly as lm-evaluation-harness encodes contexts."""
        return list(self._encode(text))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text only, never a special token added."""
        return list(self._encode_ordinary(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def __post_init__(self):
        if self.prefix_id is None:
            self.prefix_id = self.eos_id

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "o200k_compatible": self.o200k_compatible}


def o200k_tokenizer() -> EvalTokenizer:
    from vpmoe import tokenizer as tk

    return EvalTokenizer(name="o200k_harmony", sha256=tk.TOKENIZER_SHA256, eos_id=tk.EOD_ID,
                         o200k_compatible=True, _encode=tk.encode, _encode_ordinary=tk.encode,
                         _decode=tk.decode)


def hf_tokenizer_is_o200k(hf_tok) -> bool:
    """True when `hf_tok` gives o200k_harmony's ids on the probe text and the Harmony specials."""
    from vpmoe import tokenizer as tk

    try:
        if hf_tok.encode(PROBE_TEXT, add_special_tokens=False) != tk.encode(PROBE_TEXT):
            return False
        ids = hf_tok.convert_tokens_to_ids(list(HARMONY_SPECIALS))
    except Exception:  # a tokenizer that cannot even do this is not o200k
        return False
    return ids == [tk.SPECIAL_TOKENS[s] for s in HARMONY_SPECIALS]


def files_sha256(directory: Path, names) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        path = directory / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def hf_dir_tokenizer(directory: Path) -> EvalTokenizer:
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise UserError(f"{directory}: has tokenizer files but AutoTokenizer cannot load them: {e}") from None
    compatible = hf_tokenizer_is_o200k(hf_tok)
    if compatible:
        from vpmoe import tokenizer as tk
        sha, name = tk.TOKENIZER_SHA256, "o200k_harmony (hf files)"
    else:
        shipped = [p.name for p in directory.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
        sha, name = "hf-files:" + files_sha256(directory, shipped), f"hf:{type(hf_tok).__name__}"
    eos = hf_tok.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise UserError(f"{directory}: its tokenizer defines no eos_token; set eos_token in tokenizer_config.json")
    return EvalTokenizer(name=name, sha256=sha, eos_id=int(eos), o200k_compatible=compatible,
                         prefix_id=hf_tok.bos_token_id if hf_tok.bos_token_id is not None else int(eos),
                         _encode=lambda s: hf_tok.encode(s),
                         _encode_ordinary=lambda s: hf_tok.encode(s, add_special_tokens=False),
                         _decode=lambda ids: hf_tok.decode(ids), hf=hf_tok)


def tokenizer_for(directory: Path | None) -> EvalTokenizer:
    if directory is not None and any((directory / f).is_file() for f in TOKENIZER_FILES):
        return hf_dir_tokenizer(directory)
    return o200k_tokenizer()


# ----------------------------------------------------------------------------------------------
# models


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r}: expected one of auto, {', '.join(table)}")
    return table[dtype]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict in name order: equal weights give equal hashes, whatever the format."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def inner_vpmoe(model: torch.nn.Module):
    """The `VpMoE` inside `model` (itself or the HF wrapper's `.model`), else None."""
    try:
        from vpmoe.model.model import VpMoE
    except ImportError:
        return None
    if isinstance(model, VpMoE):
        return model
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, VpMoE) else None


def as_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """A bare VpMoE (e.g. from a training checkpoint) is wrapped so it answers like an HF causal LM."""
    if inner_vpmoe(model) is model:
        from vpmoe.model.hf import to_hf
        return to_hf(model)
    return model


class SubsetCausalLM(torch.nn.Module):
    """A model trained on a vocabulary subset (vpmoe.data.vocab_subset), seen in o200k ids.

    Inputs are mapped full -> compact; logits come back over the full vocabulary with -inf outside
    the subset (probability 0: the model cannot emit those ids), so likelihood scoring and greedy
    decoding see an ordinary o200k model. An input id outside the subset has no embedding row: it
    is refused with the id named (such a model can only be scored on text its subset covers).
    No `generate` here: a vpMoE inside decodes through `vpmoe.model.generate` with the subset
    (`harness.greedy_generate_many`), any other model through the harness's step-by-step path."""

    def __init__(self, model: torch.nn.Module, subset, source: str):
        super().__init__()
        self.inner, self.subset, self.source = model, subset, source
        self.config = getattr(model, "config", None)
        self.cfg = getattr(inner_vpmoe(model), "cfg", None)
        self.register_buffer("kept", torch.from_numpy(subset.ids), persistent=False)

    def compact(self, input_ids: torch.Tensor) -> torch.Tensor:
        """o200k ids -> the model's compact ids; an id outside the subset is refused by name."""
        try:
            return self.subset.to_compact(input_ids)
        except ValueError as e:
            raise UserError(f"{self.source}: {e}: this model was trained on a vocabulary subset and has no "
                            "embedding for that token; evaluate it on text inside its subset, or train "
                            "without data.vocab_subset") from None

    def forward(self, input_ids: torch.Tensor, **kwargs):
        out = self.inner(input_ids=self.compact(input_ids), **kwargs)
        logits = out.logits
        full = logits.new_full((*logits.shape[:-1], self.subset.full_vocab_size), float("-inf"))
        out.logits = full.index_copy_(-1, self.kept.to(logits.device), logits)
        return out


def with_vocab_subset(model: torch.nn.Module, path: Path, info: dict) -> torch.nn.Module:
    """Wrap `model` in SubsetCausalLM when its directory (or the run's latest checkpoint) holds a
    vocab subset; the report's model entry names the subset."""
    from vpmoe.data.vocab_subset import VocabSubset

    directory = path
    if not (path / "config.json").is_file():
        try:
            from vpmoe.train.checkpoint import resolve_checkpoint
            directory = resolve_checkpoint(path)
        except Exception:  # noqa: BLE001 - the model loaded already; no checkpoint dir means no subset
            directory = path
    subset = VocabSubset.find(directory)
    if subset is None:
        return model
    info["vocab_subset"] = {"ids": len(subset), "sha256": subset.sha256}
    return SubsetCausalLM(model, subset, str(path))


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: EvalTokenizer
    info: dict


def checkpoint_loader():
    """`vpmoe.train.checkpoint.load_model_for_eval` when this install has it, else None."""
    if importlib.util.find_spec("vpmoe.train") is None or importlib.util.find_spec("vpmoe.train.checkpoint") is None:
        return None
    return getattr(importlib.import_module("vpmoe.train.checkpoint"), "load_model_for_eval", None)


def resolved_checkpoint(path: Path) -> Path:
    """The checkpoint a path names (a run dir: its newest one), so the report records which was
    evaluated; the path itself where this install cannot tell (its loader then says why)."""
    if checkpoint_loader() is None:
        return path
    module = importlib.import_module("vpmoe.train.checkpoint")
    try:
        return module.resolve_checkpoint(path)
    except module.CheckpointError:
        return path


def load_checkpoint_model(path: Path) -> torch.nn.Module:
    loader = checkpoint_loader()
    if loader is None:
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json), and this install "
                        "cannot read training checkpoints (no vpmoe.train.checkpoint.load_model_for_eval); "
                        f"run `vpmoe export {path} OUT_DIR` and evaluate OUT_DIR")
    try:
        return loader(str(path))
    except UserError:
        raise
    except ConfigError as e:  # the checkpoint module's own errors name the file; say what else was tried
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json), and not a usable "
                        f"vpmoe training checkpoint: {e}") from None
    except Exception as e:
        raise UserError(f"{path}: could not load the training checkpoint ({type(e).__name__}: {e}); "
                        "if it is not a vpmoe checkpoint, pass a Hugging Face model directory") from None


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """MODEL path -> LoadedModel (eval mode, on `device`); UserError naming the path when it cannot load."""
    import vpmoe  # noqa: F401  (registers vpMoE with the transformers Auto classes)

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model path does not exist")
    if not path.is_dir():
        raise UserError(f"{path}: expected a model directory (Hugging Face dir with config.json, or a "
                        "vpmoe training checkpoint dir)")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)
        except Exception as e:
            raise UserError(f"{path}: could not load as a Hugging Face causal LM "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        kind, tok_dir = "hf", path
    else:
        path = resolved_checkpoint(path)  # a run dir: its newest checkpoint, fixed before loading
        model = as_causal_lm(load_checkpoint_model(path)).to(dt)
        kind, tok_dir = "checkpoint", None
    model = model.to(dev).eval()
    tokenizer = tokenizer_for(tok_dir)
    info = describe_model(model, tokenizer, str(path), kind, dev, dt)
    return LoadedModel(with_vocab_subset(model, path, info).eval(), tokenizer, info)


def describe_model(model, tokenizer: EvalTokenizer, path: str, kind: str, device, dtype) -> dict:
    n_params = sum(p.numel() for p in model.parameters())
    return {"path": path, "kind": kind, "class": type(model).__name__,
            "is_vpmoe": inner_vpmoe(model) is not None, "n_params": n_params,
            "weights_sha256": weights_sha256(model), "tokenizer": tokenizer.describe(),
            "device": str(device), "dtype": str(dtype).replace("torch.", "")}

"""Shared fixtures for the eval tests: tiny models, scripted models, tiny bundles, tiny data.

Imported by the other tests/test_eval_*.py files. The one test here checks the scripted models
behave as their docstrings promise, since other tests rely on them as references.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_BUNDLE = SHARED / "data" / "eval_bundle"
VOCAB = 201088


def shared_bundle() -> Path:
    """The real partial CORE bundle beside the project; a clear failure when it is absent."""
    if not (SHARED_BUNDLE / "core.yaml").is_file():
        if os.environ.get("VPMOE_NO_SHARED") == "1":
            pytest.skip("VPMOE_NO_SHARED=1: ../shared/data/eval_bundle not required")
        pytest.fail(f"{SHARED_BUNDLE} is missing: this test reads the real CORE items from ../shared "
                    "(set VPMOE_NO_SHARED=1 to run without ../shared)")
    return SHARED_BUNDLE


def tiny_qwen(path: Path, seed: int = 0, init: float = 0.5, with_tokenizer: bool = False) -> Path:
    """A random 2-layer Qwen3 with the o200k vocab, saved as an HF dir (optionally with tokenizer files)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
                      tie_word_embeddings=True, initializer_range=init, eos_token_id=199999)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(cfg).eval().save_pretrained(path)
    if with_tokenizer:
        from vpmoe.eval.lm_eval_bridge import o200k_hf_tokenizer
        o200k_hf_tokenizer().save_pretrained(path)
    return path


def tiny_vpmoe(path: Path, seed: int = 0) -> Path:
    """A random vpMoE from configs/tiny.toml, exported as an HF dir."""
    from vpmoe.config import load_model_config
    from vpmoe.model.hf import to_hf
    from vpmoe.model.model import VpMoE

    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    torch.manual_seed(seed)
    to_hf(VpMoE(cfg).eval()).save_pretrained(path)
    return path


class ScriptedLM(torch.nn.Module):
    """Logits that put all mass on `predict(prefix)`; `logits_to_keep` supported so only needed rows exist."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and a state dict

    def predict(self, prefix: list[int]) -> int:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, use_cache=None, **kwargs):
        B, T = input_ids.shape
        keep = logits_to_keep or T
        logits = torch.full((B, keep, VOCAB), -30.0)
        rows = input_ids.tolist()
        for b in range(B):
            for j, t in enumerate(range(T - keep, T)):
                logits[b, j, self.predict(rows[b][:t + 1])] = 30.0
        return SimpleNamespace(logits=logits)


class AlwaysHarmonyLM(ScriptedLM):
    """After any `<|start|>assistant`, emits a fixed analysis message then a final message + <|return|>."""

    ANALYSIS = "Let me think about this carefully."
    FINAL = "The answer is 4."

    def __init__(self):
        super().__init__()
        from vpmoe import tokenizer as tk

        self.opener = [tk.START_ID] + tk.encode("assistant")
        self.script = tk.get_encoding().encode(
            f"<|channel|>analysis<|message|>{self.ANALYSIS}<|end|><|start|>assistant"
            f"<|channel|>final<|message|>{self.FINAL}<|return|>", allowed_special="all")
        self.eod = tk.EOD_ID

    def predict(self, prefix):
        for k in range(len(self.script) - 1, -1, -1):  # longest script prefix already emitted
            head = prefix[len(prefix) - k - len(self.opener):len(prefix) - k]
            if head == self.opener and prefix[len(prefix) - k:] == self.script[:k]:
                return self.script[k]
        return self.eod


class CopyOracleLM(ScriptedLM):
    """Copies the tokens after the last `Input:` once it sees `Output:` (a perfect number copier)."""

    def __init__(self):
        super().__init__()
        from vpmoe import tokenizer as tk

        self.inp, self.out = tk.encode("Input:"), tk.encode("Output:")
        self.eod = tk.EOD_ID

    @staticmethod
    def last_end(seq, pattern, before):
        for i in range(before - len(pattern), -1, -1):
            if seq[i:i + len(pattern)] == pattern:
                return i + len(pattern)
        return None

    def predict(self, prefix):
        q = self.last_end(prefix, self.out, len(prefix))
        p = self.last_end(prefix, self.inp, q - len(self.out)) if q is not None else None
        if p is None:
            return self.eod
        src = p + (len(prefix) - q)
        return prefix[src] if src < len(prefix) else self.eod


def write_bundle(root: Path, tasks: list[dict], items: dict[str, list[dict]], baselines: dict[str, float]) -> Path:
    """A bundle in the DCLM layout: core.yaml, eval_meta_data.csv, eval_data/<uri>."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks}, sort_keys=False))
    lines = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description"]
    lines += [f"{label},toy,toy,0,0,{b},," for label, b in baselines.items()]
    (root / "eval_meta_data.csv").write_text("\n".join(lines) + "\n")
    for spec in tasks:
        if spec["label"] in items:
            path = root / "eval_data" / spec["dataset_uri"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(it) + "\n" for it in items[spec["label"]]))
    return root


TOY_TASKS = [
    {"label": "toy_mc", "dataset_uri": "toy/mc.jsonl", "num_fewshot": [2], "icl_task_type": "multiple_choice",
     "continuation_delimiter": "\nAnswer: "},
    {"label": "toy_schema", "dataset_uri": "toy/schema.jsonl", "num_fewshot": [1], "icl_task_type": "schema",
     "continuation_delimiter": " "},
    {"label": "toy_lm", "dataset_uri": "toy/lm.jsonl", "num_fewshot": [0], "icl_task_type": "language_modeling",
     "continuation_delimiter": " "},
]
TOY_ITEMS = {
    "toy_mc": [
        {"query": "Question: What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "gold": 0},
        {"query": "Question: How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "gold": 1},
        {"query": "Question: Which is a fruit?", "choices": ["carrot", "apple"], "gold": 1},
        {"query": "Question: What do bees make?", "choices": ["milk", "silk", "honey"], "gold": 2},
    ],
    "toy_schema": [
        {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                             "The trophy did not fit in the suitcase because the suitcase"],
         "continuation": "was too big.", "gold": 0},
        {"context_options": ["Anna thanked Maria because Anna", "Anna thanked Maria because Maria"],
         "continuation": "had helped her.", "gold": 1},
        {"context_options": ["The cup fell on the glass and the cup", "The cup fell on the glass and the glass"],
         "continuation": "broke into pieces.", "gold": 1},
    ],
    "toy_lm": [
        {"context": "The capital of France is", "continuation": "Paris"},
        {"context": "One, two, three, four,", "continuation": "five"},
    ],
}
TOY_BASELINES = {"toy_mc": 30.0, "toy_schema": 50.0, "toy_lm": 0.0}


def toy_bundle(root: Path, extra_lm: list[dict] | None = None) -> Path:
    """The toy bundle; `extra_lm` items go into a fourth task `toy_lm_greedy` with an empty delimiter."""
    tasks, items, baselines = list(TOY_TASKS), dict(TOY_ITEMS), dict(TOY_BASELINES)
    if extra_lm:
        tasks.append({"label": "toy_lm_greedy", "dataset_uri": "toy/lm_greedy.jsonl", "num_fewshot": [0],
                      "icl_task_type": "language_modeling", "continuation_delimiter": ""})
        items["toy_lm_greedy"], baselines["toy_lm_greedy"] = extra_lm, 0.0
    return write_bundle(root, tasks, items, baselines)


def toy_data(root: Path, n_rows: int = 12) -> Path:
    """A `vpmoe data build` output from a small SYNTH-schema parquet (half of it in valid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vpmoe.data.build import build

    root.mkdir(parents=True, exist_ok=True)
    table = {"row_id": [f"r{i}" for i in range(n_rows)],
             "query": [f"What is {i} plus {i + 1}?" for i in range(n_rows)],
             "synthetic_reasoning": [f"We add {i} and {i + 1}, which gives {2 * i + 1}." for i in range(n_rows)],
             "synthetic_answer": [f"The answer is {2 * i + 1}." for i in range(n_rows)]}
    pq.write_table(pa.table(table), root / "synth.parquet")
    build(str(root / "synth.parquet"), root / "data", seq_len=256, valid_fraction=0.5, progress=False)
    return root / "data"


def test_scripted_models_do_what_they_claim():
    from vpmoe import tokenizer as tk

    harmony = AlwaysHarmonyLM()
    prompt = [1, 2, 3] + harmony.opener
    out = []
    for _ in range(len(harmony.script)):
        out.append(harmony.predict(prompt + out))
    assert out == harmony.script
    copier = CopyOracleLM()
    text = "Input: 12\nOutput: 12\nInput: 48213\nOutput:"
    ids = tk.encode(text)
    want = tk.encode(text + " 48213\n")[len(ids):]
    got = []
    for _ in range(len(want)):
        got.append(copier.predict(ids + got))
    assert got == want

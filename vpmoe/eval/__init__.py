"""Evaluation of vpMoE (and any Hugging Face causal LM): `vpmoe eval MODEL --suite NAME --out REPORT.json`.

Suites: `core8` (DCLM CORE subset, core.py), `ppl` (held-out span NLL, ppl.py), `format` (Harmony
validity of greedy generations, format.py), `numeric` (number tokenisation and copying, numeric.py),
`router` (expert load health, router.py), `all`. Everything talks to the model through the HF
causal-LM interface (`model(input_ids=...).logits`, `generate`), see harness.py; loading.py turns a
path into (model, tokenizer); report.py writes the JSON + PNG; docs/eval.md explains the metrics.
"""

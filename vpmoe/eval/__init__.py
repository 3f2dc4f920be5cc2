"""Evaluation of vpMoE (and any Hugging Face causal LM): `vpmoe eval MODEL --suite NAME --out REPORT.json`.

Files: `loading.py` (MODEL path -> model + tokenizer + hashes), `harness.py` (log-likelihood scoring
and greedy generation through the HF causal-LM interface), `core.py` (the CORE eval bundle and the
CORE-8 suite), `ppl.py` (the held-out split and span NLL), `format.py` (Harmony validity of greedy
generations), `numeric.py` (number tokenisation and copying), `router.py` (expert load health),
`report.py` (JSON + PNG, deltas, reference row), `lm_eval_bridge.py` (optional lm-evaluation-harness
bridge), `cli.py` (`vpmoe eval`, `vpmoe eval fetch-bundle`). docs/eval.md explains the metrics.
"""

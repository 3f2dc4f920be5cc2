"""Teacher scoring, the teacher cache and the KD/CE losses (docs/kd.md).

Modules: `losses` (LossSpec, targets, reference materialised losses), `fused` (chunked fused
losses from hidden states + head weight), `cache` (compact encoding, shard writer/reader, batch
lookup), `teacher` (hf and vllm backends), `score` (the scoring job), `objective` (KDConfig and
the trainer-facing objective), `cli` (`vpmoe teacher score|verify`).
"""


class KDError(ValueError):
    """A user-facing KD error (bad cache, teacher failure, mismatched data): one clear line."""

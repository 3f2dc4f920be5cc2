"""Training engine: run config, Muon+AdamW, WSD schedule, FSDP2 + expert parallelism, DCP
checkpoints, metrics/report, and the loop (`trainer.Trainer`). See docs/training.md."""

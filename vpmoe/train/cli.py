"""`vpmoe train`, `vpmoe report`, `vpmoe export`: the training component's subcommands.

Design choices:
- `vpmoe train CONFIG` is the same command on one process and under `torchrun --nproc-per-node N`
  (multi-node: torchrun's rendezvous flags); `--resume` continues from the newest complete
  checkpoint in the run directory (a fresh start when there is none, so a requeued job can
  always pass it).
- Errors the user can fix (bad config, refused checkpoint, bad data) are ConfigError and print
  as one line (exit 2); a diverged run prints which quantity went non-finite (exit 3); a run
  stopped by SIGTERM / SIGUSR1 checkpoints after the step in flight and exits 75 (EX_TEMPFAIL:
  not done, `--resume` continues; under torchrun the agent reports the workers' exit as a failure);
  a GPU out of memory prints the settings that decide memory and the changes that would fit (exit 4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vpmoe.config import ConfigError, checkpointed_blocks, describe_checkpointing


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from vpmoe.data import DataError
    from vpmoe.kd import KDError
    from vpmoe.train.config import load_run_config
    from vpmoe.train.parallel import shutdown_distributed
    from vpmoe.train.signals import TrainingStopped
    from vpmoe.train.trainer import Trainer, TrainingDiverged

    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"train.run_dir={json.dumps(args.run_dir)}")  # a TOML string
    cfg = load_run_config(args.config, overrides)
    trainer = None
    try:
        try:
            trainer = Trainer(cfg, resume=args.resume)
            result = trainer.run()
        except torch.OutOfMemoryError:
            world = trainer.ds.world if trainer is not None else int(os.environ.get("WORLD_SIZE", "1"))
            advice = out_of_memory_advice(cfg, trainer.step if trainer is not None else None, world)
            print(f"vpmoe train: stopped: {advice}", file=sys.stderr)
            return 4
        except TrainingDiverged as e:
            print(f"vpmoe train: stopped: {e}", file=sys.stderr)
            return 3
        except TrainingStopped as e:
            print(f"vpmoe train: {e}", file=sys.stderr)
            return 75
        except (DataError, KDError) as e:  # bad or corrupt data or teacher cache: the message names the file
            raise ConfigError(str(e)) from None
    finally:
        shutdown_distributed()
    if trainer.ds.is_main:
        msg = f"vpmoe train: done at step {result['step']}"
        if "valid/loss" in result:
            msg += f"; held-out loss {result['valid/loss']:.4f}"
        print(msg)
    return 0


def out_of_memory_advice(cfg, step: int | None, world: int) -> str:
    """What to tell a user whose run hit `torch.OutOfMemoryError`: the settings that decide memory,
    the peak, and the changes that fit it in a smaller budget (each only if not already made).
    Checkpoints are never touched by an out-of-memory step, so the advice ends in `--resume`."""
    where = "while building the model and optimizer" if step is None else f"after {step} completed steps"
    rows, accum = cfg.data.micro_batch_size, cfg.train.grad_accum
    ac = describe_checkpointing(cfg.train.activation_checkpointing, cfg.model.n_layers)
    msg = (f"the GPU ran out of memory {where} ({rows} rows x {cfg.data.seq_len} tokens per micro-batch, "
           f"{accum} micro-batches per step, {world} process(es), activation checkpointing {ac}, "
           f"Muon momentum {cfg.optim.muon_momentum_dtype}")
    import torch  # here, as in cmd_train: `vpmoe --help` should not pay for importing torch

    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        msg += f"; peak {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} of {total:.1f} GiB"
    fixes = []
    n_layers = cfg.model.n_layers
    n_ac = checkpointed_blocks(cfg.train.activation_checkpointing, n_layers)
    if 0 < n_ac < n_layers:  # partial: a few more checkpointed blocks is the smallest change
        fixes.append(f"--set train.activation_checkpointing={min(n_ac + 4, n_layers)} (each block checkpointed "
                     "keeps only its input: ~1.7 GiB less per block for vpMoE at 32 x 2048 tokens per micro-batch)")
    if ac != "on":
        fixes.append("--set train.activation_checkpointing=true (every block keeps only its input; "
                     "with bf16 momentum the 80-layer model peaked at 61.8 GiB at 16 x 2048 tokens per micro-batch)")
    if cfg.optim.muon_momentum_dtype == "float32":
        fixes.append("--set optim.muon_momentum_dtype=bfloat16 (half the Muon state: -11.2 GB for vpMoE)")
    if cfg.optim.adamw_moments_dtype == "float32":
        fixes.append("--set optim.adamw_moments_dtype=bfloat16 (the embedding's and head's AdamW moments: -1.6 GB)")
    if rows > 1:
        smaller = rows // 2 if rows % 2 == 0 else 1  # divides rows: the global batch is kept exactly
        fixes.append(f"--set data.micro_batch_size={smaller} --set train.grad_accum={accum * rows // smaller} "
                     f"(the same {rows * accum} rows per step per process)")
    fixes.append("more GPUs with torchrun (FSDP2 shards weights, gradients and optimizer state)")
    return (msg + "). Checkpoints already written are intact. To fit, try: " + "; or ".join(fixes)
            + "; then rerun the same command with --resume.")


def cmd_report(args: argparse.Namespace) -> int:
    from vpmoe.train.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path} and plots in {path.parent}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vpmoe.train.checkpoint import export_hf

    out = export_hf(args.checkpoint, args.hf)
    print(f"wrote {out} (load with vpmoe.model.hf.register(); AutoModelForCausalLM.from_pretrained)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train from a run config: span-normalised CE (stage 1), offline or online KD (stage 2, [kd])")
    p.add_argument("config", help="run TOML ([model], [data], [optim], [schedule], [train], [checkpoint], ...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=10")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    p.add_argument("--run-dir", help="shorthand for --set train.run_dir=...")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("report", help="plots + markdown summary of a training run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("export", help="write a Hugging Face directory from a training checkpoint")
    p.add_argument("checkpoint", help="checkpoint dir (RUN/checkpoints/step_N) or run dir (its newest)")
    p.add_argument("--hf", required=True, help="output directory (must not exist)")
    p.set_defaults(func=cmd_export)

"""Warmup-stable-decay (WSD) learning-rate schedule.

Design choices:
- A pure function of the optimizer step, so the schedule needs no state of its own: resuming at
  step k gives the same lr as the uninterrupted run (the checkpoint stores the step).
- Linear warmup from lr/warmup to lr, a long flat stage, then a decay over the last
  `decay_fraction` of the run down to `min_lr_ratio * lr`. The decay shape is configurable:
  `linear`, `cosine` or `sqrt` (`1 - sqrt(progress)`, the shape the WSD papers found best).
- Stage budgets are in optimizer steps; the trainer converts the token budget into steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from vpmoe.config import ConfigError


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # share of the total steps spent decaying at the end
    min_lr_ratio: float = 0.0
    decay_shape: str = "sqrt"  # linear | cosine | sqrt

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction: must be in [0, 1], got {self.decay_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_shape not in ("linear", "cosine", "sqrt"):
            raise ConfigError(f"decay_shape: expected linear, cosine or sqrt, got {self.decay_shape!r}")


def wsd_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of a run of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = int(round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if cfg.decay_shape == "linear":
        shape = 1.0 - progress
    elif cfg.decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - math.sqrt(progress)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

"""The run config: one TOML file, one dataclass per section, validated through vpmoe.config.

Design choices:
- `RunConfig` nests the component dataclasses: `[model]` (vpmoe.config.ModelConfig), `[data]`,
  `[optim]` (optim.OptimConfig), `[schedule]` (schedule.ScheduleConfig), `[train]`,
  `[checkpoint]`, `[parallel]` (parallel.ParallelConfig) and `[kd]` (kept as a table here and
  validated as vpmoe.kd.objective.KDConfig, which owns its fields).
- `--set section.key=value` overrides are applied to the parsed TOML before validation, so an
  override is checked exactly like a file value and errors name the dotted key.
- Relative paths in `[data]` and `train.init_from` resolve against the config file's directory
  first, then the working directory, so configs under `configs/` work from anywhere.
- Batch geometry: `data.micro_batch_size` rows per rank per micro-batch, `train.grad_accum`
  micro-batches per optimizer step; the global batch is their product times the world size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpmoe.config import ConfigError, ModelConfig, apply_overrides, checkpointed_blocks, from_dict, read_toml
from vpmoe.train.optim import OptimConfig
from vpmoe.train.parallel import ParallelConfig
from vpmoe.train.schedule import ScheduleConfig

@dataclass
class DataSection:
    path: str = ""  # dataset directory written by `vpmoe data build` (manifest + splits)
    train_split: str = "train"
    valid_split: str = "valid"
    seq_len: int = 2048
    micro_batch_size: int = 4  # rows per rank per micro-batch
    shuffle_seed: int = 0
    vocab_subset: str = ""  # "" full vocabulary | "auto" (ids of this dataset) | path to vocab_subset.json

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("path: required (a directory made by `vpmoe data build`)")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")


@dataclass
class TrainSection:
    run_dir: str = "runs/stage1"
    steps: int = 1000  # optimizer steps of the whole run (the schedule's length)
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA sm80+, else fp32) | bf16 | fp32
    activation_checkpointing: bool | int = False  # true: every block; N: the first N blocks (the rest keep activations)
    lean_saves: bool = False  # fast path: blocks that keep activations keep ~30% less, recomputing cheap pointwise work in backward
    fast_path: str = "auto"  # auto (on CUDA sm80+) | on | off: the model's fused kernels and fused optimizer step
    cuda_graphs: str = "auto"  # auto (one sm90/sm100 device, fast path, no online KD) | on (refuses where it cannot) | off
    w_reasoning: float = 1.0
    w_final: float = 1.0
    init_from: str = ""  # checkpoint dir, run dir or HF dir to start from (fresh optimizer)
    log_every: int = 1
    eval_every: int = 100  # held-out loss every N steps (0: only at the end)
    eval_rows: int = 64  # held-out rows per evaluation, over all ranks (0: the whole valid split)
    expert_load_every: int = 10  # per-layer expert loads to expert_load.jsonl every N steps
    loss_chunk_rows: int = 0  # rows per chunk of the fused loss (0: its own choice; small helps CPU)
    peak_flops: float = 0.0  # per device, for MFU; 0: measured at the start (a bf16 matmul on GPUs)
    progress: bool = True
    tensorboard: bool = True
    profile_steps: int = 0  # profile N steps (after the first 10 on a GPU) into run_dir/profile/ (train/profiling.py)

    def validate(self) -> None:
        if self.loss_chunk_rows < 0:
            raise ConfigError(f"loss_chunk_rows: must be >= 0, got {self.loss_chunk_rows}")
        if self.profile_steps < 0:
            raise ConfigError(f"profile_steps: must be >= 0 (0: off), got {self.profile_steps}")
        for name in ("steps", "grad_accum", "log_every", "expert_load_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_rows < 0:
            raise ConfigError("eval_every / eval_rows: must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        if self.fast_path not in ("auto", "on", "off"):
            raise ConfigError(f"fast_path: expected auto, on or off, got {self.fast_path!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs: expected auto, on or off, got {self.cuda_graphs!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype: expected auto, bf16 or fp32, got {self.dtype!r}")
        if self.w_reasoning < 0 or self.w_final < 0:
            raise ConfigError("w_reasoning / w_final: must be >= 0")
        if self.peak_flops < 0:
            raise ConfigError(f"peak_flops: must be >= 0 (0: measured), got {self.peak_flops}")


@dataclass
class CheckpointSection:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 3  # newest complete checkpoints kept
    verify: str = "sha256"  # sha256 | size: how resume checks the files against provenance

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"every: must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"keep: must be >= 1, got {self.keep}")
        if self.verify not in ("sha256", "size"):
            raise ConfigError(f"verify: expected sha256 or size, got {self.verify!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kd: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})

    def validate(self) -> None:
        self.kd_config()  # the KD component validates its own table (names kd.<key> on errors)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        checkpointed_blocks(self.train.activation_checkpointing, self.model.n_layers)  # the count's range


    def kd_config(self):
        from vpmoe.kd.objective import KDConfig

        kd = dict(self.kd)
        if isinstance(kd.get("loss"), dict):  # a partial [kd.loss] table keeps the KD default kind (LossSpec's is "ce")
            kd["loss"] = {"kind": "fkl", **kd["loss"]}
        return from_dict(KDConfig, kd, "kd")


def _resolve_path(value: str, base: Path) -> str:
    """Config-relative if that exists, else as given (relative to the working directory)."""
    if not value or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run TOML, apply `key=value` overrides, validate; errors name the file and key."""
    path = Path(path)
    data = apply_overrides(read_toml(path), list(overrides or []))
    base = path.resolve().parent
    if "data" in data and isinstance(data["data"].get("path"), str):
        data["data"]["path"] = _resolve_path(data["data"]["path"], base)
    if "train" in data and isinstance(data["train"].get("init_from"), str):
        data["train"]["init_from"] = _resolve_path(data["train"]["init_from"], base)
    if "data" in data and data["data"].get("vocab_subset") not in (None, "", "auto"):
        data["data"]["vocab_subset"] = _resolve_path(str(data["data"]["vocab_subset"]), base)
    for key in ("cache", "teacher"):
        if "kd" in data and isinstance(data["kd"].get(key), str):
            data["kd"][key] = _resolve_path(data["kd"][key], base)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:  # a key that came from the command line is named as such
        named = [k for k in (o.split("=", 1)[0].strip() for o in overrides or []) if k in str(e)]
        raise ConfigError(f"{path}{f' with --set {named[0]}' if named else ''}: {e}") from None


def run_config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)

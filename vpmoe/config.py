"""TOML configs validated into dataclasses.

Design choices:
- Every config is a plain `@dataclass`; `from_dict` walks its fields, recursing into nested dataclass
  fields, so each component (model, data, train, kd, eval) owns its own dataclass and the run config
  just nests them. No registry, no framework.
- Unknown keys and ill-typed values are errors that name the dotted key (`model.n_experts`), and
  each dataclass's `validate()` checks the semantics (e.g. heads divisible by KV heads) and names
  the field that is wrong.
- `ModelConfig` is the locked vpMoE architecture; `configs/vpmoe.toml` sets every field explicitly,
  `configs/tiny.toml` changes sizes only. `model_hash` fingerprints the semantics (what a
  checkpoint's weights mean), so resume/export can refuse a mismatched checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and the dotted key."""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {tp}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_check_type(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys and ill-typed values, then validate."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{e}") from None
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_section(path: str | Path, cls: type[T], section: str) -> T:
    """Load table `[section]` of a TOML file into `cls`; errors name the file and the key."""
    data = read_toml(path)
    if section not in data:
        raise ConfigError(f"{path}: no [{section}] table")
    try:
        return from_dict(cls, data[section], section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides (value parsed as a TOML value, else kept as a string)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a table")
        node[parts[-1]] = value
    return data


def settings_changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key old -> new' for every leaf of two nested settings dicts that differs (a resumed run's
    record of what it changed)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}")



def checkpointed_blocks(setting: bool | int, n_layers: int) -> int:
    """How many blocks `train.activation_checkpointing` covers, the first ones: true = all, false =
    none, N = the first N (the rest keep their activations: memory to spare buys a shorter
    backward). A count outside [0, n_layers] is a ConfigError naming the key."""
    if isinstance(setting, bool):
        return n_layers if setting else 0
    if not 0 <= setting <= n_layers:
        raise ConfigError(f"train.activation_checkpointing: true, false or a block count in [0, {n_layers}] "
                          f"(the first N blocks), got {setting}")
    return setting


def describe_checkpointing(setting: bool | int, n_layers: int) -> str:
    """"on", "off" or "on for the first N of L blocks" (logs and advice)."""
    n = checkpointed_blocks(setting, n_layers)
    return "on" if n == n_layers else "off" if n == 0 else f"on for the first {n} of {n_layers} blocks"


@dataclass
class ModelConfig:
    """The vpMoE architecture. Defaults are the locked model (docs/architecture.md)."""

    vocab_size: int = 201088
    d_model: int = 1024
    n_layers: int = 80
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 128
    # attention: layer i is global when (i + 1) % global_every == 0, else sliding-window local
    global_every: int = 4
    window: int = 128  # local layers: query i sees keys j with i - window + 1 <= j <= i
    tpa_q_rank: int = 4
    tpa_kv_rank: int = 2
    rope_base: float = 10000.0  # GRAPE-M frequencies start at RoPE's inv_freq with this base
    grape_log_scale: float = 16.0  # log_freq = log(inv_freq) * scale; freq = exp(log_freq / scale)
    # FFNs: squared ReLU, not gated
    n_dense_layers: int = 1
    dense_ffn: int = 128
    n_experts: int = 256
    expert_ffn: int = 128
    shared_ffn: int = 512
    top_k: int = 4
    n_groups: int = 8
    topk_groups: int = 4
    route_scale: float = 2.5
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-4
    norm_eps: float = 1e-5
    init_std: float = 0.02
    max_seq_len: int = 2048

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "global_every", "tpa_q_rank", "tpa_kv_rank", "n_experts", "expert_ffn",
                     "shared_ffn", "dense_ffn", "top_k", "n_groups", "topk_groups", "max_seq_len"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                 f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary, got {self.head_dim}")
        _require(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers",
                 f"must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        _require(self.n_experts % self.n_groups == 0, "n_groups",
                 f"n_experts={self.n_experts} is not divisible by n_groups={self.n_groups}")
        _require(self.topk_groups <= self.n_groups, "topk_groups",
                 f"topk_groups={self.topk_groups} exceeds n_groups={self.n_groups}")
        per_group = self.n_experts // self.n_groups
        _require(self.top_k <= self.topk_groups * per_group, "top_k",
                 f"top_k={self.top_k} exceeds the experts in the selected groups "
                 f"(topk_groups={self.topk_groups} x {per_group} experts per group)")
        _require(self.top_k % self.topk_groups == 0, "top_k",
                 f"top_k={self.top_k} must be divisible by topk_groups={self.topk_groups} "
                 "(a group's score sums its top top_k/topk_groups experts)")
        _require(self.top_k // self.topk_groups <= per_group, "top_k",
                 f"top_k/topk_groups={self.top_k // self.topk_groups} exceeds experts per group {per_group}")
        _require(self.route_scale > 0, "route_scale", f"must be > 0, got {self.route_scale}")
        _require(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        _require(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        _require(self.norm_eps > 0, "norm_eps", "must be > 0")
        _require(self.rope_base > 1, "rope_base", "must be > 1")
        _require(self.grape_log_scale > 0, "grape_log_scale", "must be > 0")

    # --- derived facts ---
    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    def is_moe(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_experts // self.n_groups


def load_model_config(path: str | Path) -> ModelConfig:
    """The `[model]` table of any TOML file (model configs and run configs alike)."""
    return load_section(path, ModelConfig, "model")


def config_hash(obj: Any) -> str:
    """sha256 of a dataclass's canonical JSON; equal configs give equal hashes."""
    blob = json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Human-readable differences between two model configs ('field: a != b')."""
    da, db = to_dict(a), to_dict(b)
    return [f"{k}: {da[k]!r} != {db.get(k)!r}" for k in da if da[k] != db.get(k)]

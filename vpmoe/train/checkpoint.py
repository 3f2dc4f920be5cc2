"""Checkpoints: DCP save/load with provenance, atomic directories, verification, HF export.

Design choices:
- Layout: `RUN/checkpoints/step_000123/` holds the DCP files (model incl. router-bias buffers,
  optimizer incl. param groups, trainer counters; sharded however the job was sharded),
  `rank_00000.pt` per rank (python/numpy/torch RNG states and the loader's state: these are
  per-rank by nature) and `provenance.json` (git sha, config + model + data + tokenizer hashes,
  world size, and the size and sha256 of every file in the directory).
- Atomic: everything is written into `step_N.tmp/`; rank 0 writes provenance.json last and
  renames the directory. A directory without `.tmp` is complete by construction; a crash leaves
  only a `.tmp` that the next save of that step removes. The newest `keep` checkpoints are kept
  (older ones are renamed `.deleting` before removal, so no half-deleted `step_N` ever exists).
- Verification before use: provenance parses, every listed file exists with the recorded size
  and sha256 (hashing is split over ranks), model config and tokenizer match the run (differences
  are named through `model_diff`). Nothing is written while verifying or loading, so a refused
  resume leaves the run directory exactly as it was.
- Model-only loads (`init_from`, eval, export) read only the `model.*` keys, into any sharding.
- A run on a vocabulary subset keeps `vocab_subset.json` in every checkpoint and export, so
  whoever loads the model can map ids (vpmoe.data.vocab_subset.VocabSubset.find).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from vpmoe.config import ConfigError, ModelConfig, from_dict, model_diff
from vpmoe.utils import file_sha256

STEP_DIR = re.compile(r"^step_(\d+)$")
PROVENANCE = "provenance.json"
SUBSET_FILE = "vocab_subset.json"  # vpmoe.data.vocab_subset.FILENAME


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file."""


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save / dcp.load, single-process without DCP's 'assuming single process' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        fn(state, checkpoint_id=str(path), no_dist=not _dist_on())


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _gather(obj) -> list:
    if not _dist_on():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only (no context on the others)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------- listing


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (no .tmp suffix) of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name)) and (p / PROVENANCE).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank_state: dict, provenance: dict, keep: int,
                    extra_writer=None) -> Path:
    """Collective: every rank calls it. `extra_writer(dir)` (rank 0) adds files such as the vocab
    subset before the directory is hashed. Returns the final directory."""
    rank, world = _rank_world()
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        if final.exists():
            raise CheckpointError(f"{final}: already exists; refusing to overwrite a complete checkpoint")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
        for doomed in root.glob("step_*.deleting") if root.is_dir() else []:
            shutil.rmtree(doomed, ignore_errors=True)  # a crash during pruning
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "trainer": dict(trainer_state)}
    _dcp(dcp.save, state, tmp)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0 and extra_writer is not None:
        extra_writer(tmp)
    _barrier()
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in names[rank::world]}
    files = {}
    for part in _gather(mine):
        files.update(part)
    if rank == 0:
        prov = dict(provenance, step=step, world_size=world, files=files)
        _write_json_atomic(tmp / PROVENANCE, prov)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            doomed = old.with_name(old.name + ".deleting")  # never a half-deleted step_N
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    _barrier()
    return final


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- verifying


def read_provenance(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    prov_path = path / PROVENANCE
    if not prov_path.is_file():
        raise CheckpointError(f"{prov_path}: missing; {path} is not a complete checkpoint")
    try:
        prov = json.loads(prov_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{prov_path}: corrupt ({e})") from None
    for key in ("step", "files", "model", "world_size"):
        if key not in prov:
            raise CheckpointError(f"{prov_path}: field {key!r} missing")
    return prov


def verify_checkpoint(path: str | Path, hashes: bool = True) -> dict:
    """Collective when distributed. Check every file against provenance; return the provenance."""
    path = Path(path)
    prov = read_provenance(path)
    if ".metadata" not in prov["files"]:
        raise CheckpointError(f"{path / PROVENANCE}: lists no DCP .metadata file")
    rank, world = _rank_world()
    problems = []
    for name in sorted(prov["files"])[rank::world]:
        want, f = prov["files"][name], path / name
        if not f.is_file():
            problems.append(f"{f}: missing (a shard of the checkpoint)")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, provenance says {want['bytes']} (truncated or corrupt)")
        elif hashes and file_sha256(f) != want["sha256"]:
            problems.append(f"{f}: sha256 does not match provenance (corrupt)")
    problems = [p for part in _gather(problems) for p in part]
    if problems:
        raise CheckpointError("; ".join(problems))
    return prov


def check_compatible(prov: dict, path: str | Path, model_cfg: ModelConfig, tokenizer_sha: str | None) -> None:
    """Refuse a checkpoint whose model semantics or tokenizer differ from this run's."""
    try:
        ckpt_cfg = from_dict(ModelConfig, prov["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}/{PROVENANCE}: model config unreadable: {e}") from None
    diff = model_diff(ckpt_cfg, model_cfg)
    if diff:
        raise CheckpointError(f"{path}: model config differs from the run's (checkpoint != run): " + "; ".join(diff))
    ckpt_tok = prov.get("tokenizer_sha")
    if tokenizer_sha and ckpt_tok and ckpt_tok != tokenizer_sha:
        raise CheckpointError(f"{path}: tokenizer sha256 {ckpt_tok[:12]}... != the data's {tokenizer_sha[:12]}...")


def check_global_batch(prov: dict, path: str | Path, world: int, micro_batch_size: int, grad_accum: int) -> None:
    """Refuse a resume that changes the global batch (ranks x rows x micro-batches per step),
    naming the grad_accum that keeps it on this world size where one does."""
    old_rows = prov["world_size"] * prov["config"]["data"]["micro_batch_size"] * prov["config"]["train"]["grad_accum"]
    rows, per_step = world * micro_batch_size * grad_accum, world * micro_batch_size
    if old_rows != rows:
        fix = (f"set train.grad_accum = {old_rows // per_step}" if old_rows % per_step == 0 else
               "no grad_accum gives it with this world size and micro_batch_size")
        raise CheckpointError(
            f"{path}: written with a global batch of {old_rows} rows per step ({prov['world_size']} ranks), "
            f"this run has {rows} ({world} ranks x {micro_batch_size} rows x {grad_accum} micro-batches); "
            f"resume keeps the global batch: {fix}")


# ---------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load model + optimizer + trainer counters (collective); return (trainer_state, this rank's state)."""
    path = Path(path)
    rank, world = _rank_world()
    try:  # the world size it was written by (verify_checkpoint has checked the whole record)
        saved_world = int(json.loads((path / PROVENANCE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / PROVENANCE}: unreadable world_size ({e!r})") from None
    # the loader state is global (the same in every rank file); the RNG state is per rank and is
    # only carried over when the world size is unchanged
    rank_file = path / f"rank_{rank if saved_world == world else 0:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing (checkpoint incomplete?)")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "trainer": {"step": 0, "tokens": 0, "elapsed": 0.0}}
    try:
        _dcp(dcp.load, state, path)
    except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures; name the checkpoint
        raise CheckpointError(f"{path}: DCP load failed: {str(e).strip().splitlines()[-1][:500]}") from e
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rank_state = torch.load(rank_file, weights_only=False)
    if saved_world != world:
        rank_state["rng"] = None
    return state["trainer"], rank_state


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Model weights (and router biases) only, from a DCP checkpoint, into any sharding."""
    state = {"model": get_model_state_dict(model)}
    try:
        _dcp(dcp.load, state, path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: DCP load failed: {str(e).strip().splitlines()[-1][:500]}") from e
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / PROVENANCE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {PROVENANCE}) nor a run dir with checkpoints")
    return latest


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json naming a model_type."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or (Path(path) / PROVENANCE).is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _subset_name(sha: str | None) -> str:
    return sha or "none (full vocabulary)"


def find_resume(run_dir: str | Path, cfg, subset_sha: str | None, fingerprint: dict, world: int) -> Path | None:
    """The run's newest checkpoint, verified against this run (`cfg`: its RunConfig): vocabulary
    subset, model config and tokenizer, global batch (`world` processes), dataset manifest; None
    if it has none. Refuses a mismatch with the checkpoint's path and both values."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    prov = verify_checkpoint(path, hashes=cfg.checkpoint.verify == "sha256")
    old_subset = prov.get("vocab_subset_sha")
    if old_subset != subset_sha:
        raise CheckpointError(f"{path}: trained with vocab subset {_subset_name(old_subset)}, "
                              f"this run uses {_subset_name(subset_sha)} (data.vocab_subset)")
    check_compatible(prov, path, cfg.model, fingerprint.get("tokenizer_sha"))
    check_global_batch(prov, path, world, cfg.data.micro_batch_size, cfg.train.grad_accum)
    old, new = prov.get("data_manifest_sha"), fingerprint.get("manifest_sha")
    if old and new and old != new:
        raise CheckpointError(f"{path}: trained on a different dataset (manifest sha256 {old[:12]}... "
                              f"!= {new[:12]}... of {cfg.data.path})")
    return path


def init_model_from(model: nn.Module, source: str, cfg, subset_sha: str | None, fingerprint: dict) -> None:
    """`train.init_from`: weights only (the optimizer and step start fresh) into `model` (any
    sharding; strict, every tensor) from an HF export dir, a checkpoint or a run dir, after checking
    the vocabulary subset, the model config and (checkpoints) the tokenizer against this run."""
    from vpmoe.data.vocab_subset import VocabSubset

    def check_subset(found: str | None, where) -> None:
        if found != subset_sha:
            raise ConfigError(f"train.init_from {where}: vocab subset {_subset_name(found)} != "
                              f"this run's {_subset_name(subset_sha)} (data.vocab_subset)")

    if is_hf_dir(source):
        found = VocabSubset.find(source)
        check_subset(found.sha256 if found is not None else None, source)
        from vpmoe.model.hf import VpMoEForCausalLM, register
        register()
        hf = VpMoEForCausalLM.from_pretrained(source)
        diff = model_diff(hf.model.cfg, cfg.model)
        if diff:
            raise ConfigError(f"train.init_from {source}: model config differs: " + "; ".join(diff))
        # every rank holds the full HF weights; each keeps its shards
        set_model_state_dict(model, hf.model.state_dict(), options=StateDictOptions(full_state_dict=True, strict=True))
        return
    path = resolve_checkpoint(source)
    prov = verify_checkpoint(path, hashes=cfg.checkpoint.verify == "sha256")
    check_subset(prov.get("vocab_subset_sha"), path)
    check_compatible(prov, path, cfg.model, fingerprint.get("tokenizer_sha"))
    load_model_weights(path, model)


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A `VpMoE` in eval mode from a checkpoint dir, a run dir (latest checkpoint) or an HF dir."""
    from vpmoe.model.model import VpMoE

    if is_hf_dir(path):
        from vpmoe.model.hf import VpMoEForCausalLM, register
        register()
        return VpMoEForCausalLM.from_pretrained(str(path)).model.to(device).eval()
    ckpt = resolve_checkpoint(path)
    prov = verify_checkpoint(ckpt)
    cfg = from_dict(ModelConfig, prov["model"], "model")
    with torch.device("meta"):  # no random init: every parameter and router bias comes from the checkpoint
        model = VpMoE(cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)  # strict: a tensor the checkpoint lacks is an error, never garbage
    return model.to(device).eval()


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an HF directory (AutoModelForCausalLM-loadable) from a checkpoint; atomic rename."""
    from vpmoe.model.hf import register, to_hf

    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output directory")
    model = load_model_for_eval(checkpoint)
    register()
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh temporary name of our own beside OUT: nothing of the user's is ever removed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf = to_hf(model)
        hf.save_pretrained(str(tmp))
        subset = resolve_checkpoint(checkpoint) / SUBSET_FILE
        if subset.is_file():  # a model trained on a vocab subset reads and writes compact ids
            shutil.copyfile(subset, tmp / SUBSET_FILE)
        prov = read_provenance(resolve_checkpoint(checkpoint))
        _write_json_atomic(tmp / "vpmoe_provenance.json", {k: v for k, v in prov.items() if k != "files"})
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the export private
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out

"""The training loop every stage uses: span-normalised loss, router balancing, DP/EP, checkpoints.

Design choices:
- Setup order makes a refused resume harmless: config -> process groups -> data -> (resume:
  verify the checkpoint, check model config / tokenizer / data / global batch) -> model on
  "meta" -> expert parallel -> FSDP2 -> each rank allocates its shards and draws them (a fresh
  run) or fills them from `init_from` / the resumed checkpoint -> optimizer -> load state. Only after all of that
  succeeded is anything written to the run directory.
- Loss (training plan): `w_r * mean over reasoning positions + w_f * mean over final positions`
  of the *global* batch. Before any forward, the step's micro-batches are fetched and their
  per-span token counts summed and all-reduced; every micro-batch's `fused_span_loss` is then
  normalised by those global counts, so gradients summed over micro-batches and ranks equal the
  single-rank full-batch gradient (tests check 1 rank vs 2 ranks, FSDP2 and EP).
- Router: the sequence aux loss (`out.aux_loss`, a mean over the micro-batch's rows) is weighted
  by rows / global rows, giving the global batch's mean. Expert loads are summed over
  micro-batches, all-reduced, and applied once per optimizer step (`update_router_biases`).
- Numerics: fp32 master weights; bf16 autocast around the model on CUDA (configurable), the
  loss in the hidden states' dtype. NaN/inf in the loss or the gradient norm stops the run
  (the last good checkpoint stays the newest one): before the optimizer step on the reference
  path; after it on the fused ones, which read the step's loss sums, gradient norm and expert
  loads in one host read once the whole step is queued (nothing before it waits for the GPU);
  `run` makes that read after the next step is queued (vpmoe/train/launched.py), except before a
  checkpoint, an evaluation or a stop.
- Stop signals (SIGTERM, SIGUSR1): the step in flight finishes, every rank agrees to stop after
  the same step (a one-flag all-reduce), a checkpoint is written, and `vpmoe train` exits 75
  (`TrainingStopped`); `--resume` continues as after any checkpoint.
- Exact resume: the checkpoint after step k holds everything the next step depends on (weights,
  optimizer, router biases, loader position, RNG); the lr is a function of the step.
- Resume on another number of ranks: DCP reshards weights and optimizer state (expert DTensors
  too) and the loader state is one global position, so a run continues on any world size (or EP
  size) that keeps the global batch (a different one is refused, naming the grad_accum that keeps
  it); the same trajectory up to reduction order (tests: 1 -> 2 and 2 -> 1 ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vpmoe.config import ConfigError, checkpointed_blocks, config_hash, settings_changed
from vpmoe.kd.fused import auto_chunk_size
from vpmoe.kd.losses import count_span_tokens, span_means
from vpmoe.kd.objective import KDObjective, is_kd_step
from vpmoe.model import kernels as K
from vpmoe.train import checkpoint as ckpt
from vpmoe.train.config import RunConfig, run_config_dict
from vpmoe.train.data import BatchSource, dataset_fingerprint, eval_batches, resolve_vocab_subset
from vpmoe.train.expert_parallel import apply_expert_parallel
from vpmoe.train.launched import LaunchedStep
from vpmoe.train.metrics import MetricsLogger, Progress, flops_per_token, measure_matmul_flops, router_stats
from vpmoe.train.optim import build_optimizer, set_lr
from vpmoe.train.parallel import (DistState, all_reduce_grads, all_reduce_host, all_reduce_sum, clip_grads, grad_norm,
                                  init_distributed, replicas_agree, shard_model, sync_unsharded_grads)
from vpmoe.train.prefetch import StepPrefetcher
from vpmoe.train.profiling import WARM_UP, StepProfiler, profile_window
from vpmoe.train.schedule import wsd_factor
from vpmoe.train.signals import TrainingStopped, stop_signals
from vpmoe.train.span_stats import N_STATS, pack_stats, span_report, unpack_stats
from vpmoe.utils import git_sha


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN/inf; the message names the step and the quantity."""


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        self.ds: DistState = init_distributed(cfg.train.device, cfg.parallel)
        self.device = self.ds.device
        # several ranks, each running the one-device fused step on the whole model (parallel.py)
        self.replicate = self.ds.world > 1 and cfg.parallel.data_parallel == "replicate"
        self.capability = K.cuda_capability(self.device)  # None on the CPU
        bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and K.bf16_fast_path_ok(self.capability))
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self._seed_everything(cfg.train.seed)

        self.train_data = BatchSource(cfg.data, cfg.data.train_split, self.ds.rank, self.ds.world)
        self.fingerprint = dataset_fingerprint(cfg.data.path)
        self.subset = resolve_vocab_subset(cfg.data)
        self.subset_sha = self.subset.sha256 if self.subset is not None else None  # what checkpoints record
        if self.subset is not None and cfg.model.vocab_size != len(self.subset):
            # the head and embedding have one row per kept id; the subset size comes from the data
            cfg.model = dataclasses.replace(cfg.model, vocab_size=len(self.subset))
        if not resume and (ckpt.list_checkpoints(self.run_dir) or (self.run_dir / "metrics.jsonl").exists()):
            raise ConfigError(f"train.run_dir {self.run_dir} already holds a run; pass --resume to continue it "
                              "or choose a new run directory")
        self.start_ckpt = (ckpt.find_resume(self.run_dir, cfg, self.subset_sha, self.fingerprint, self.ds.world)
                           if resume else None)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0

        torch.manual_seed(cfg.train.seed)  # the init seed, the same on every rank
        from vpmoe.model.model import VpMoE
        # shapes only: experts are split and FSDP2 shards on "meta", then each rank allocates its
        # shards and draws them (VpMoE.reset_parameters: the full tensor one parameter at a time)
        with torch.device("meta"):
            model = VpMoE(cfg.model)
        model.gradient_checkpointing = cfg.train.activation_checkpointing
        self._module_fast_paths(model)
        apply_expert_parallel(model, self.ds)
        self.model = shard_model(model, self.ds, cfg.parallel)
        model.to_empty(device=self.device)
        if self.start_ckpt is None and cfg.train.init_from:
            ckpt.init_model_from(model, cfg.train.init_from, cfg, self.subset_sha, self.fingerprint)  # strict: every tensor
        elif self.start_ckpt is None:
            model.reset_parameters()
        # else: load_checkpoint below fills every tensor (strict), so no random draw first
        self.body = self._fused_body(model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.fast_opt = None
        if self.body is not None:
            from vpmoe.train.optim_fast import FastMuonAdamW, streams_for, supported
            if supported(self.optimizer):
                self.fast_opt = FastMuonAdamW(self.optimizer, max_grad_norm=cfg.optim.grad_clip,
                                              **streams_for(cfg.train.activation_checkpointing))
        self.graphed = self._cuda_graphs()
        self._eval_needs_release = False  # a mid-run evaluation ran out of memory beside the graphs
        if self.start_ckpt is not None:
            trainer_state, rank_state = ckpt.load_checkpoint(self.start_ckpt, self.model, self.optimizer)
            self.step, self.tokens_seen = int(trainer_state["step"]), int(trainer_state["tokens"])
            self.elapsed = float(trainer_state.get("elapsed", 0.0))
            self.train_data.load_state_dict(rank_state["loader"])
            if rank_state.get("rng") is not None:  # None: written by another world size
                ckpt.set_rng_state(rank_state["rng"])
        # the loader state after the last consumed step (what a checkpoint saves; the prefetch
        # thread reads ahead, so the loader itself is one step further)
        self._loader_state = self.train_data.state_dict()
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = cfg.train.peak_flops or measure_matmul_flops(self.device, self.amp_dtype or torch.float32)
        kd_cfg = cfg.kd_config()
        if not kd_cfg.chunk_size:
            kd_cfg.chunk_size = cfg.train.loss_chunk_rows
        if not kd_cfg.chunk_size and self.device.type == "cuda" and kd_cfg.mode != "online":
            # the loss's own CUDA budget, doubled where every block keeps its activations (kd/fused.py)
            kd_cfg.chunk_size = auto_chunk_size(cfg.model.vocab_size, self.amp_dtype or torch.float32, False, True,
                                                kept=not cfg.train.activation_checkpointing)
        self.kd_mode = kd_cfg.mode
        self.objective = KDObjective(kd_cfg, data_dir=cfg.data.path, split=cfg.data.train_split,
                                     device=self.device, subset=self.subset)

        # everything above only read; from here on the run directory is written
        self.metrics = MetricsLogger(self.run_dir, self.ds.is_main, self.step, cfg.train.tensorboard)
        if self.ds.is_main:
            self._write_config()

    # ------------------------------------------------------------------------------ setup helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _graphs_wanted(self) -> tuple[bool, str]:
        """(use CUDA graphs?, why not). Graphs need one CUDA device, the fused body and optimizer
        step, and targets staged before the replay: CE, or offline KD (cached targets staged over
        all positions, `KDObjective.staged_target`); online KD runs a teacher inside the step.
        Activation checkpointing is graphed too (each block recomputed inside the captured backward)."""
        cfg = self.cfg
        kd_mode = cfg.kd_config().mode
        reasons = [why for bad, why in (
            (self.device.type != "cuda", "the device is not CUDA"),
            (self.device.type == "cuda" and not K.grouped_mm_graphable(self.capability),
             f"torch._grouped_mm syncs the host on compute capability {self.capability} (its loop "
             "fallback; sync-free on sm90/sm100 only), which a CUDA graph cannot capture"),
            (self.ds.world != 1 and not self.replicate, "more than one process (FSDP2/EP run their own hooks)"),
            (cfg.train.fast_path == "off", "train.fast_path is off"),
            (self.body is not None and self.fast_opt is None, "the fused optimizer step is unavailable"),
            (kd_mode == "online", "online KD runs the teacher inside the step"),
            (self.subset is not None, "a vocab subset is in use")) if bad]
        return not reasons, "; ".join(reasons)

    def _cuda_graphs(self):
        """The graphed step (`vpmoe.model.graphed`) where `train.cuda_graphs` asks for it and it can run."""
        mode = self.cfg.train.cuda_graphs
        ok, why = self._graphs_wanted()
        if mode == "off" or (mode == "auto" and not ok):
            return None
        if not ok:
            raise ConfigError(f"train.cuda_graphs = on, but {why}; set it to auto or off")
        from vpmoe.model.graphed import GraphedTrainStep
        self.body.static_masks = True
        self._graph_counts = None  # the step's global span counts, staged for the captured loss
        reduce = None
        if self.replicate:  # replicas: gradients and loads summed between the backward's graphs and the update's
            def reduce(grads, load_sum):
                all_reduce_grads(grads, self.ds)
                all_reduce_sum(load_sum, self.ds)
        return GraphedTrainStep(self.body, self._graph_loss, self.fast_opt, micro=self.cfg.train.grad_accum,
                                reduce=reduce, ranks=self.ds.world)

    def _graph_loss(self, hidden, batch, scale):
        """The objective inside the captured step: sync-free, normalised by the global span counts
        staged in `_graph_counts` (so `scale` is not needed); CE, or gated KD/CE (`_graph_batches`)."""
        if self.amp_dtype is not None:
            hidden = hidden.to(self.amp_dtype)
        loss, stats = self.objective(hidden, self.model.lm_head.weight, batch, self.step,
                                     w_r=self.cfg.train.w_reasoning, w_f=self.cfg.train.w_final,
                                     span_token_counts=self._graph_counts, kd=False, static=True,
                                     head_low=None if self.body is None else self.body.head_low())
        return loss, pack_stats(stats)

    def _graph_batches(self, micro_batches: list[dict]) -> list[dict]:
        """Micro-batches as the captured step reads them: offline KD runs need this step's teacher
        targets (or a dummy on CE steps) and the KD/CE gate, staged by `_produce_step` or here."""
        if self.kd_mode != "offline":
            return micro_batches
        kd = is_kd_step(self.objective.cfg, self.step)
        return [b if "kd_gate" in b else dict(b, **self.objective.staged_target(b, kd)) for b in micro_batches]

    def _produce_step(self, step: int) -> tuple[list[dict], dict]:
        """Step `step`'s micro-batches and the loader state after them, on the prefetch thread
        (vpmoe/train/prefetch.py): packed rows plus, for offline KD, the decoded cache rows (every
        step when graphed: CE steps get the dummy target and gate 0). Pinned for async copies on CUDA."""
        batches = [self.train_data.next() for _ in range(self.cfg.train.grad_accum)]
        state = self.train_data.state_dict()
        if self.kd_mode == "offline":
            kd = is_kd_step(self.objective.cfg, step)
            if kd or self.graphed is not None:
                batches = [dict(b, **self.objective.staged_target(b, kd)) for b in batches]
        if self.device.type == "cuda":  # not while the main thread captures (vpmoe/model/graphed.py)
            from vpmoe.model.graphed import pin_outside_capture
            batches = pin_outside_capture(batches)
        return batches, state

    def _fast_path_on(self) -> bool:
        mode = self.cfg.train.fast_path  # auto: CUDA sm80+ (bf16 tensor cores, Flex kernels)
        return mode == "on" or (mode == "auto" and K.bf16_fast_path_ok(self.capability))

    def _module_fast_paths(self, model) -> None:
        """Several ranks (FSDP2/EP module hooks must run): the model's fast kernels inside its own
        modules; expert parallelism then replaces the MoE dispatcher with its own."""
        if self._fast_path_on() and self.ds.world > 1 and not self.replicate:
            K.use_fast_paths(model)

    def _fused_body(self, model):
        """One device (or replicas, `parallel.data_parallel = "replicate"`): the fused body
        (`vpmoe.model.fast.FastBody`, which checkpoints its blocks when `train.activation_checkpointing`
        asks) and, later, the fused optimizer step. Built on the materialised model (it holds its
        parameters). None where it does not apply."""
        lean = self.cfg.train.lean_saves
        if not self._fast_path_on() or (self.ds.world > 1 and not self.replicate):
            if lean:
                warnings.warn("train.lean_saves applies to the fused body (one device, fast path); ignored here")
            return None
        from vpmoe.model.fast import FastBody
        body = FastBody(model, checkpoint=self.cfg.train.activation_checkpointing, lean_saves=lean)
        if lean and not body.lean_blocks():
            warnings.warn("train.lean_saves: every block is checkpointed (it keeps only its input): no effect")
        return body

    def compute_summary(self) -> str:
        """One line on how this run computes: device, precision, code path, CUDA graphs (and why
        not, where `auto` left them off), checkpointing, processes. Printed at the start of a run."""
        cfg, dev = self.cfg, self.device
        where = str(dev)
        if dev.type == "cuda":
            where += f" ({torch.cuda.get_device_name(dev)}, sm{self.capability[0]}{self.capability[1]})"
        if self.body is not None:
            path = "fused body" + (" (Triton attention prologue)" if self.body.fused_prologue else "")
            if self.fast_opt is not None:
                n = 1 + len(self.fast_opt.side_streams)
                path += " + fused optimizer" + (f" on {n} CUDA streams" if n > 1 else "")
        else:
            path = "module path" + (" with fused kernels" if self._fast_path_on() else "")
        parts = [where, "bf16 autocast" if self.amp_dtype is not None else "fp32", path]
        if self.graphed is not None:
            parts.append("CUDA graphs")
        else:
            why = "train.cuda_graphs = off" if cfg.train.cuda_graphs == "off" else self._graphs_wanted()[1]
            parts.append(f"no CUDA graphs ({why})")
        n_layers = cfg.model.n_layers
        n_ac = checkpointed_blocks(cfg.train.activation_checkpointing, n_layers)
        if n_ac:
            parts.append("activation checkpointing" + ("" if n_ac == n_layers else f" for the first {n_ac} of {n_layers} blocks"))
        if self.body is not None and self.body.lean_blocks():
            parts.append(f"lean saves for {self.body.lean_blocks()} blocks")
        parts.append(f"{self.ds.world} process(es)")
        if self.ds.ep_size > 1:
            parts.append(f"expert parallel {self.ds.ep_size}")
        if self.replicate:
            parts.append("data parallel by replicas (gradients all-reduced)")
        how = "train.peak_flops" if cfg.train.peak_flops else "matmul rate measured here"
        tflops = self.peak_flops / 1e12  # four decimals below 10: a CPU's ~0.05 must not print as 0.0
        parts.append(f"MFU against {tflops:.{1 if tflops >= 10 else 4}f} TFLOP/s per device ({how})")
        return ", ".join(parts)

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "run_config.json.tmp"
        tmp.write_text(json.dumps(run_config_dict(self.cfg), indent=1, default=str))
        tmp.replace(self.run_dir / "run_config.json")

    def provenance(self) -> dict:
        return {"git_sha": git_sha(), "config_hash": config_hash(self.cfg),
                "model": dataclasses.asdict(self.cfg.model), "model_hash": config_hash(self.cfg.model),
                "tokenizer_sha": self.fingerprint.get("tokenizer_sha"),
                "data_manifest_sha": self.fingerprint.get("manifest_sha"), "data_path": str(self.cfg.data.path),
                "expert_parallel": self.ds.ep_size, "torch": torch.__version__,
                "vocab_subset_sha": self.subset_sha,
                "config": run_config_dict(self.cfg)}

    # ------------------------------------------------------------------------------ one step

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}

    def _forward_loss(self, batch: dict, span_counts: torch.Tensor | None, kd: bool | None = None):
        """(loss tensor, stats, aux_loss, expert_load) for one micro-batch. The batch keeps full
        o200k ids; with a vocab subset the model reads compact ids (the objective maps labels)."""
        tokens = batch["tokens"] if self.subset is None else self.subset.to_compact(batch["tokens"])
        if self.body is not None:
            hidden, aux, load = self.body(tokens, batch["doc_ids"])
        else:
            with self._autocast():
                out = self.model(tokens, doc_ids=batch["doc_ids"], return_hidden=True)
            hidden, aux, load = out.hidden, out.aux_loss, out.expert_load
        if self.amp_dtype is not None:
            hidden = hidden.to(self.amp_dtype)
        loss, stats = self.objective(hidden, self.model.lm_head.weight, batch, self.step,
                                     w_r=self.cfg.train.w_reasoning, w_f=self.cfg.train.w_final,
                                     span_token_counts=span_counts, kd=kd)
        return loss, stats, aux, load

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One step, its report read at once (`run` reads each report after the next step is queued)."""
        return self.finish_step(self.launch_step(micro_batches))

    def launch_step(self, micro_batches: list[dict]) -> LaunchedStep:
        """Queue one whole step and the copy of its figures to the host; nothing waits for the GPU
        (on one process) until `finish_step` reads them."""
        cfg, ds = self.cfg, self.ds
        set_lr(self.optimizer, wsd_factor(self.step, cfg.train.steps, cfg.schedule))
        micro_batches = [self._to_device(b) for b in micro_batches]
        # count first: the global batch's per-span tokens and rows normalise every micro-batch
        span_counts = torch.zeros(3, dtype=torch.int64, device=self.device)
        local_rows = 0
        for b in micro_batches:
            span = b["span_id"].long() * (b["loss_mask"] != 0).long()
            span_counts += count_span_tokens(span)
            local_rows += b["tokens"].shape[0]
        all_reduce_sum(span_counts, ds)  # stays on the device: nothing reads it here
        # the rows are summed on the host (a read of a device sum would idle the GPU until the
        # previous step's work drained, before this step's work is queued)
        global_rows = all_reduce_host([local_rows], ds)[0]

        if self.graphed is not None:
            stats_sum, load_sum = self._graphed_accumulate(micro_batches, span_counts)
        else:
            stats_sum, load_sum = self._accumulate(micro_batches, span_counts, global_rows)
        fused = self.graphed is not None or self.fast_opt is not None
        if not fused:  # the reference step never applies a non-finite loss's gradients
            self._check_loss(stats_sum, self.step + 1)
        gnorm = self._optimizer_step(load_sum)
        self.step += 1  # the step's one host read, queued after all of its work
        return LaunchedStep.queue(self.step, stats_sum, gnorm, load_sum, self.optimizer.param_groups[0]["lr"],
                                  global_rows)

    def finish_step(self, launched: LaunchedStep) -> dict:
        """The step's report from its figures (waits for the step to finish); a NaN/inf loss or
        gradient norm stops the run here."""
        stats_host, gnorm, load = launched.read()
        report = self._check_loss(stats_host, launched.step)
        if not math.isfinite(gnorm):  # the fused paths stepped already (clipping is folded in)
            self._diverged(f"gradient norm is not finite ({gnorm})", launched.step)
        if self.kd_mode != "none":  # kd / kl / teacher log-prob per span, and whether this was a KD step
            stats = unpack_stats(stats_host[:-1])
            kd_step = is_kd_step(self.objective.cfg, launched.step - 1)  # a CE step has no teacher figures
            report.update({k: v for k, v in span_means(stats).items()
                           if k.startswith("ce/") or (kd_step and not k.startswith("loss/"))})
            report["kd_step"] = int(kd_step)
        report.update({"aux_loss": float(stats_host[-1]), "grad_norm": gnorm, "lr": launched.lr,
                       "rows": launched.rows, "tokens_step": launched.rows * self.cfg.data.seq_len})
        report["_load"] = load
        return report

    def _check_loss(self, stats_sum: torch.Tensor, step: int) -> dict:
        """The per-span report from the packed sums (+ aux loss) of `step`; stops the run on NaN/inf."""
        report = span_report(unpack_stats(stats_sum[:-1]), self.cfg.train.w_reasoning, self.cfg.train.w_final)
        if not math.isfinite(report["loss"]) or not torch.isfinite(stats_sum).all():
            self._diverged(f"loss is not finite ({report['loss']})", step)
        return report

    def _accumulate(self, micro_batches, span_counts, global_rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of every micro-batch, launched eagerly; returns the all-reduced
        (packed per-span stats + aux loss, expert loads)."""
        ds = self.ds
        stats_sum = torch.zeros(3 * N_STATS + 1, dtype=torch.float64, device=self.device)
        load_sum = None
        for b in micro_batches:
            loss, stats, aux, load = self._forward_loss(b, span_counts)
            aux_part = aux * (b["tokens"].shape[0] / global_rows)
            # FSDP2 averages (see parallel.py); replicas sum (`all_reduce_grads`)
            ((loss + aux_part) * (1 if self.replicate else ds.world)).backward()
            stats_sum[:-1] += pack_stats(stats).to(self.device)
            stats_sum[-1] += aux_part.detach().double()
            load_sum = load if load_sum is None else load_sum + load
        all_reduce_sum(stats_sum, ds)
        all_reduce_sum(load_sum, ds)
        if self.replicate:
            all_reduce_grads([p.grad for p in self.params if p.grad is not None], ds)
        else:
            sync_unsharded_grads(self.model, ds)
        return stats_sum, load_sum

    def _graphed_accumulate(self, micro_batches, span_counts) -> tuple[torch.Tensor, torch.Tensor]:
        """`_accumulate` through the CUDA graphs (replicas: the graphed step summed the gradients and
        loads; the logged sums are summed here, the aux loss as the ranks' mean)."""
        g = self.graphed
        if self._graph_counts is None:
            self._graph_counts = span_counts.clone()
        else:
            self._graph_counts.copy_(span_counts)
        g.accumulate(self._graph_batches(micro_batches))
        stats = all_reduce_sum(torch.cat([g.stats_sum, g.aux_sum.double().view(1) / self.ds.world]), self.ds)
        return stats, g.load_sum.clone()

    def _optimizer_step(self, load_sum) -> torch.Tensor:
        """Clip + step + router-bias update; returns the gradient norm (a device tensor). A
        non-finite norm stops the run: here, before the step, on the reference path; on the fused
        ones at `train_step`'s host read, after the step (clipping is folded in there and nothing
        waits for the host; the weights in memory are then lost, never saved)."""
        if self.graphed is not None:
            self.graphed.update()  # optimizer and bias update inside graph 3
            gnorm = self.graphed.grad_norm
        elif self.fast_opt is not None:
            gnorm = self.fast_opt.step()
        else:
            gnorm = grad_norm(self.params)
            if not torch.isfinite(gnorm):
                self._diverged(f"gradient norm is not finite ({float(gnorm)})", self.step + 1)
            clip_grads(self.params, self.cfg.optim.grad_clip, gnorm)
            self.optimizer.step()
        if self.graphed is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.update_router_biases(load_sum)
        return gnorm

    def _diverged(self, what: str, step: int) -> None:
        raise TrainingDiverged(f"step {step}: {what}; stopping. {self._last_good()}")

    def _last_good(self) -> str:
        newest = ckpt.latest_checkpoint(self.run_dir)
        return "No checkpoint was written before it." if newest is None else f"{newest} is the last good checkpoint."

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out per-span loss over the first `eval_rows` rows of the valid split."""
        cfg, ds = self.cfg, self.ds
        batches = eval_batches(cfg.data, cfg.data.valid_split, ds.rank, ds.world, cfg.train.eval_rows)
        stats_sum = torch.zeros(3 * N_STATS, dtype=torch.float64, device=self.device)
        while True:
            batch = next(batches, None)
            have = torch.tensor([0 if batch is None else 1], device=self.device)
            if ds.world > 1:  # every rank must run the same number of forwards (FSDP/EP collectives)
                torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
            if int(have) == 0:
                break
            _, stats, _, _ = self._forward_loss(self._to_device(batch), None, kd=False)
            stats_sum += pack_stats(stats).to(self.device)
        all_reduce_sum(stats_sum, ds)
        return span_report(unpack_stats(stats_sum), cfg.train.w_reasoning, cfg.train.w_final, prefix="valid/")

    def _evaluate_beside_graphs(self, last_step: bool, progress: Progress) -> dict:
        """`evaluate()` where the captured step's graphs hold memory its eager forward may need:
        after the last step they are released first (nothing replays them again); before it, an
        evaluation out of memory beside them releases them and runs again, the next step captures
        them anew (in "thread_local" mode, which a pinning prefetch thread cannot break:
        bench/capture_threads.py), and later evaluations release them straight away. Out of
        memory even then: raised. Replicas release them every time: an out-of-memory retry on one
        rank alone would run the evaluation's collectives twice there and once elsewhere (a hang)."""
        g = self.graphed
        if g is None or g.graphs is None:
            return self.evaluate()
        if not last_step and not self._eval_needs_release and self.ds.world == 1:
            try:
                return self.evaluate()
            except torch.OutOfMemoryError:
                self._eval_needs_release = True
                progress.print(f"step {self.step}: held-out evaluation out of GPU memory beside the captured step: "
                               "graphs released for it and every later one (captured again after each)")
        g.release()
        return self.evaluate()

    # ------------------------------------------------------------------------------ the loop

    def save(self) -> Path:
        if self.replicate and not replicas_agree(self.params, self.ds):  # DCP would keep one rank's copy
            raise RuntimeError(f"step {self.step}: the ranks' weights differ (parallel.data_parallel = replicate "
                               f"keeps them equal only if every rank computes the same update); nothing saved. {self._last_good()}")
        trainer_state = {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed}
        rank_state = {"rng": ckpt.rng_state(), "loader": self._loader_state}
        return ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, trainer_state,
                                    rank_state, self.provenance(), self.cfg.checkpoint.keep,
                                    extra_writer=self.subset.save if self.subset is not None else None)

    def _report(self, launched: LaunchedStep, started: float, waited: float, next_started: float | None,
                progress: Progress) -> None:
        """Read and log a launched step. Its time: until the next step started (that start waited
        for this step's predecessor, so it paces the GPU), or, read at once, until now."""
        report = self.finish_step(launched)
        report["data_wait_s"] = waited
        step_time = (time.perf_counter() if next_started is None else next_started) - started
        self.elapsed += step_time
        self.tokens_seen += report["tokens_step"]
        self._log_step(report, step_time, launched.step, progress)

    def _log_step(self, report: dict, step_time: float, step: int, progress: Progress) -> None:
        cfg = self.cfg
        load = report.pop("_load")
        tokens_per_s = report["tokens_step"] / max(step_time, 1e-9)
        report.update({"tokens_per_s": tokens_per_s, "step_time_s": step_time, "tokens": self.tokens_seen,
                       "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.ds.world)})
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            report["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            report["mem_headroom_gib"] = (total - torch.cuda.max_memory_reserved(self.device)) / 2**30
        report.update(router_stats(load))
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            self.metrics.log(step, report)
        if step % cfg.train.expert_load_every == 0 or step == cfg.train.steps:
            self.metrics.log_expert_load(step, load.cpu())
        progress.update(step, report["loss"], tokens_per_s)

    def _stop_agreed(self, mine: bool) -> bool:
        """Whether any rank got a stop signal (all ranks must stop after the same step)."""
        if self.ds.world == 1:
            return mine
        return all_reduce_host([int(mine)], self.ds)[0] > 0

    def run(self) -> dict:
        cfg = self.cfg
        progress = Progress(cfg.train.steps, self.step, self.ds.is_main, cfg.train.progress)
        last_eval: dict = {}
        prefetch = StepPrefetcher(self._produce_step, self.step, cfg.train.steps)
        window = profile_window(cfg.train.profile_steps, self.step, cfg.train.steps,
                                WARM_UP if self.device.type == "cuda" else 0)
        profiler = StepProfiler(self.run_dir / "profile", window, self.device,
                                f"rank{self.ds.rank}_" if self.ds.world > 1 else "")
        with stop_signals() as received:  # SIGTERM / SIGUSR1: checkpoint after this step, exit
            try:
                progress.print(f"compute: {self.compute_summary()}")
                if cfg.train.profile_steps and window is None:
                    progress.print(f"train.profile_steps: no step to profile (the run ends by step {cfg.train.steps}; "
                                   f"on a GPU the first {WARM_UP} are never profiled)")
                if self.start_ckpt is not None:
                    progress.print(f"resumed from {self.start_ckpt} at step {self.step}")
                    if self.optimizer.changed_on_load:  # the config's settings are used: say which differ
                        progress.print("optimizer settings changed since the checkpoint: "
                                       + "; ".join(self.optimizer.changed_on_load))
                    if kd_changed := settings_changed(ckpt.read_provenance(self.start_ckpt)["config"].get("kd", {}),
                                                      run_config_dict(cfg)["kd"]):
                        progress.print("kd settings changed since the checkpoint: " + "; ".join(kd_changed))
                elif self.step == 0 and cfg.train.eval_every:  # the baseline of the held-out curve
                    last_eval = self.evaluate()
                    self.metrics.log(0, last_eval)
                    progress.print(f"step 0: held-out loss {last_eval['valid/loss']:.4f}")
                pending = None  # (launched step, its start time, data wait): reported after the next is queued
                while self.step < cfg.train.steps:
                    t0 = time.perf_counter()
                    batches, self._loader_state, waited = prefetch.get(self.step)
                    profiler.before(self.step + 1)
                    launched = self.launch_step(batches)
                    if profile := profiler.after(self.step):
                        progress.print(f"step {self.step}: profile {profile}")
                    if pending is not None:  # the previous step: the GPU runs this one meanwhile
                        self._report(*pending, t0, progress)
                    pending = (launched, t0, waited)
                    last_step = self.step == cfg.train.steps
                    saved = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last_step
                    evaluated = (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last_step
                    stopping = not last_step and self._stop_agreed(bool(received))
                    if not (saved or evaluated or stopping):
                        continue
                    self._report(*pending, None, progress)  # read before anything is saved or evaluated
                    pending = None
                    if saved:  # before the evaluation: a run whose evaluation fails keeps its weights
                        path = self.save()
                        progress.print(f"step {self.step}: checkpoint {path}")
                    if evaluated:
                        last_eval = self._evaluate_beside_graphs(last_step, progress)
                        self.metrics.log(self.step, last_eval)
                        progress.print(f"step {self.step}: held-out loss {last_eval['valid/loss']:.4f}")
                    if stopping:
                        path = path if saved else self.save()
                        why = signal.Signals(received[0]).name if received else "a stop signal on another rank"
                        raise TrainingStopped(f"{why} received: stopped after step {self.step} of {cfg.train.steps}; "
                                              f"checkpoint {path}; `vpmoe train ... --resume` continues")
            finally:
                profiler.close()
                prefetch.close()
                progress.close()
                self.metrics.close()
        return {"step": self.step, **last_eval}

"""The train step as CUDA graphs: one per micro-batch (forward, loss, backward), one for the update.

At vpMoE's sizes an eagerly launched step is CPU-bound (thousands of small kernels: 256 experts,
80 layers, Muon over 40k matrices), so the whole step is captured and replayed:
  graph 1, the first micro-batch: embedding + blocks (`FastBody`), head + loss through the
    sync-free fused CE/KD (`fused_span_loss(static=True)`), backward; the backward writes the
    gradients (they live in the graph's memory pool, so there is one set and no zeroing pass);
  graph 2 (micro > 1), every other micro-batch: the same, accumulating (`+=`) into the gradients;
    the expert loads, loss and stats go into static sums;
  graph 3, once per step: the optimizer (`FastMuonAdamW`, clipping folded in), the router-bias
    update from the summed loads, zeroed load sums.

Design choices:
- Static inputs: every tensor of a micro-batch (tokens, doc ids, labels, span ids, targets...) is
  copied into a fixed buffer before its replay, so new data never needs a new capture. The block
  masks are rebuilt from the staged doc ids inside the captured graph (`create_block_mask` is
  sync-free device work) and copied into the captured masks' tensors (`FastBody(static_masks=True)`).
  Rebuilt eagerly before each replay instead, they left the GPU idle for ~23 ms of a 95 ms step
  (20 layers, 2 x 2048 tokens, H200: 72 ms of kernels per step) while Python built them.
  All micro-batches of a run must share shapes (the data loader packs fixed rows).
- Nothing in either graph syncs with the host: routing is dropless with device-side offsets, the
  fused loss processes every row (unsupervised rows weigh 0) and counts spans on the device.
- Learning rates are device tensors (`FastMuonAdamW.lr_tensors`) refreshed before graph 2, so a
  schedule still applies; everything else a step reads is already on the device.
- The first `warmup` steps run eagerly on a side stream (compilation, allocator warm-up, lazy
  optimizer state), then the graphs are captured from the next step's first micro-batch.
- The loss function gets the static micro-batch dict and 1 / the micro-batch count; it returns a
  0-dim loss, or (loss, stats) with a 1-D stats tensor summed over micro-batches (the trainer's
  per-span sums); it must be sync-free (see `vpmoe.kd.fused`).
- Captures and host pinning never overlap: the trainer's prefetch thread pins its batches through
  `pin_outside_capture`, which waits while `CAPTURE_LOCK` is held (a capture takes seconds, once a
  run and after a release; a pin takes milliseconds). CUDA forbids `cudaHostAlloc` from any thread
  during a default "global"-mode capture: on the H200 a pinning thread broke the first one
  (bench/capture_threads.py). The captures also run in "thread_local" mode (`CAPTURE_MODE`), which
  allows other threads' calls; in one of ~25 child processes beside a free pinning thread the
  check of a replay against eager failed (2026-12-03, not reproduced or explained), hence the lock.
- `release()` frees the graphs and their pool between steps (the trainer: before the evaluation
  after the last step, and before a mid-run evaluation that did not fit beside them); the next
  step captures them again.
- With one micro-batch, the clipping norm does not read the expert weights' gradients (~5 GB of
  fp32 at 20 layers, ~72% of the norm's reads): their backward's Triton kernel sums each tile's
  squares from its registers (`FastBody.grad_sq`, `wgrad.gathered_wgrad(sq=True)`) and the
  optimizer adds those partials (`FastMuonAdamW.step(known_sq=...)`). Nor the embedding's whole
  [V, d] gradient: only its rows of the step's tokens are non-zero, so their squares are summed
  (`fast.embedding_grad_sq`; with `EMBED_ROWS` the optimizer sums the rows' squares itself). With
  more micro-batches the
  gradients are sums the kernel never holds, so the norm reads them as before (`GRAD_SQ` off: the same).
- `EMBED_ROWS` (one micro-batch): the embedding's gradient is the gradient of its lookup's output
  (a leaf, `FastBody.embed_rows`) turned into its rows of the step's tokens and a row map in the
  update graph (`FastBody.embedding_row_grads`); the optimizer gathers them inside the embedding's
  AdamW pass (`FastMuonAdamW.step(row_grads=...)`). The [V, d] fp32 gradient (~0.8 GB at V =
  201,088) is never allocated, zero-filled or read: -0.27 ms and -0.72 GiB at (a) (H200,
  2026-12-05, against `EMBED_ROWS` off in the same lease). With more micro-batches their sum is
  kept the usual way.
- `WEIGHT_COPIES` (a speed-for-memory trade, "auto" by default): the expert weights of the blocks
  that keep their activations are held in bf16 (`FastBody.use_weight_copies`), written by the
  update in the same kernel as the fp32 master (`FastMuonAdamW.weight_copies`), so no forward casts
  them. Measured at (a) on the H200 (2026-12-04): 58.26 -> 57.12 ms (-2.0%) but a 2.15 GiB higher
  allocated peak (22.34 -> 24.49 GiB): the compiled blocks evidently recompute their casts in
  backward rather than keep them, so the copies are memory of their own (~10.7 GB at 80 layers
  with no block checkpointed). "auto" (`copies_wanted`) keeps them where that memory is plainly
  spare: no block checkpointed (a run that checkpoints is short of memory by its own choice) and
  the copies at most `COPIES_AUTO_SHARE` of the device's memory (1.5% at (a) on an H200). A master
  changed outside the step (its version counter moved) is cast again before the next replay. Kept
  at every micro-batch size since 2026-12-05 (before, only within the gathered weight-gradient
  kernel's row limit, `kernels.gathered_wgrad_serves`: above it the weights were cast again).
  With them the output head's bf16 copy (`FastBody.head_low`, the loss's `head_low`), written by
  its AdamW pass: the loss's forward no longer casts the [V, d] head (~1.2 GB of traffic at V =
  201,088) for the copy's 0.4 GB write, and the copy stands where the cast's transient stood at
  the step's peak (since 2026-12-06).
- `LOW_GRADS` (True by default: up to `LOW_GRADS_MAX_MICRO` = 4 micro-batches): the expert weights'
  gradients in bf16, taken by 2-byte holder leaves (`FastBody.use_low_grads`, `FastBody.low_grads`)
  instead of the masters: the weight-gradient kernel rounds its fp32 sums once and writes half the
  bytes, the optimizer's momentum pass reads half (and computes in fp32 as before), and the fp32
  gradients (~5 GB at 20 layers) are never allocated. The clipping norm's partial sums are the
  rounded values'. The numerical change: each expert gradient element rounded to bf16 (relative
  2^-9) before the momentum, as in bf16 mixed-precision training; with more micro-batches each
  later one adds into the bf16 gradients in place (bf16 gradient accumulation: one more rounding
  of the running sum per micro-batch, so at most 3 at the cap; above it the sums stay fp32).
  Measured: at (a) with the copies -1.03 ms, -1.45 GiB (H200, 2026-12-05); at 40 layers x 64 rows
  in 2 micro-batches, 25 blocks checkpointed (H100, 2026-12-06) -14 ms of 1,513 and -4.9 GiB, and
  spent on 22 checkpointed blocks at the same peak, -41 ms (-2.7%). "always": at every
  micro-batch count. False: fp32 gradients on the masters.
- Replicas (`parallel.data_parallel = "replicate"`, several ranks each running this step): the
  gradients and expert loads are summed over the ranks by the caller's `reduce`, eagerly, between
  the last micro-batch's graph and the update's, in the static buffers both graphs use; no
  collective is captured. Not yet run on GPUs.
- `accumulate()` and `update()` are separate so a caller can inspect the step's loss and
  gradient sums (a host sync) before the update is applied; `__call__` does both.
"""
from __future__ import annotations

import threading

import torch

from vpmoe.model.fast import FastBody, update_router_biases


CAPTURE_MODE = "thread_local"  # only this thread's calls are checked (module docstring)
GRAD_SQ = True  # the clipping norm's expert and embedding parts without reading those gradients whole (one micro-batch)
EMBED_ROWS = True  # one micro-batch: the embedding's gradient as its rows of the step's tokens, no [V, d] tensor
# the kept blocks' expert weights held in bf16, written by the update (FastBody.use_weight_copies):
# -2.0% step time for +2.15 GiB at (a); "auto": where the memory is plainly spare (copies_wanted),
# True / False: always / never (module docstring)
WEIGHT_COPIES: bool | str = "auto"
COPIES_AUTO_SHARE = 0.05  # "auto" keeps copies of at most this share of the device's memory
# the expert weights' gradients in bf16 (module docstring): True = at up to LOW_GRADS_MAX_MICRO
# micro-batches (accumulated in bf16), "always" = at every count, False = never (fp32 on the masters)
LOW_GRADS: bool | str = True
LOW_GRADS_MAX_MICRO = 4  # each micro-batch after the first rounds the bf16 running sum once more
CAPTURE_LOCK = threading.Lock()  # held while capturing; other threads pin host memory outside it


def pin_outside_capture(batches: list[dict]) -> list[dict]:
    """The micro-batches' tensors in pinned host memory, pinned while no graph is being captured."""
    with CAPTURE_LOCK:
        return [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def low_grads_wanted(micro: int, setting: bool | str | None = None) -> bool:
    """Whether a step of `micro` micro-batches takes the expert gradients in bf16 (`LOW_GRADS`, or
    `setting`)."""
    setting = LOW_GRADS if setting is None else setting
    if setting not in (True, False, "always"):
        raise ValueError(f"graphed.LOW_GRADS must be True, False or 'always', got {setting!r}")
    return setting == "always" or (setting is True and micro <= LOW_GRADS_MAX_MICRO)


def copies_wanted(body: FastBody, setting: bool | str | None = None, total_memory: int | None = None) -> bool:
    """Whether to keep the bf16 expert and head weights (`WEIGHT_COPIES`, or `setting`): True /
    False as given; "auto" only for a body that checkpoints no block, on a device whose memory
    (`total_memory` bytes, read from the device when None) is at least 1 / `COPIES_AUTO_SHARE`
    times the copies' bytes."""
    setting = WEIGHT_COPIES if setting is None else setting
    if setting not in (True, False, "auto"):
        raise ValueError(f"graphed.WEIGHT_COPIES must be True, False or 'auto', got {setting!r}")
    if setting != "auto":
        return setting
    device = body.model.embed.weight.device
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    experts = [body.params[i][f"ffn.{w}"] for i, kind in enumerate(body.kind_of) if kind[1] for w in ("w_up", "w_down")]
    need = 2 * sum(p.numel() for p in [body.model.lm_head.weight, *experts])
    return body.checkpoint == 0 and need <= COPIES_AUTO_SHARE * total_memory


class GraphedTrainStep:
    def __init__(self, body: FastBody, loss_fn, optimizer, micro: int = 1, warmup: int = 2,
                 update_biases: bool = True, reduce=None, ranks: int = 1):
        """loss_fn(hidden [B, T, d], batch: dict, scale: float) -> 0-dim loss (head included).
        optimizer: a `FastMuonAdamW` over all trainable parameters; micro: micro-batches per step.
        reduce(grads: list of tensors, load_sum): for `ranks` replicas (`parallel.data_parallel =
        "replicate"`), in place, eagerly between the micro-batches' graphs and the update's, on
        the static gradient buffers: the gradients and the expert loads summed over the ranks (no
        collective inside a graph). The loss is each rank's part of the global loss (normalised
        by the global counts) and the aux loss is divided by `ranks` too, so the sums are the
        global objective's gradient. With it the one-micro-batch shortcuts that read this rank's
        own backward (GRAD_SQ, EMBED_ROWS) are off."""
        if not body.static_masks:
            raise ValueError("GraphedTrainStep needs FastBody(static_masks=True)")
        self.body, self.loss_fn, self.opt, self.micro = body, loss_fn, optimizer, micro
        self.params = [p for g in optimizer.opt.param_groups for p in g["params"] if p.requires_grad]
        self.warmup, self.update_biases, self.reduce, self.ranks = warmup, update_biases, reduce, ranks
        # one micro-batch: its backward writes the expert weights' final gradients, so their part of
        # the clipping norm comes from the weight-gradient kernel (module docstring)
        body.grad_sq = GRAD_SQ and micro == 1 and reduce is None
        body.embed_rows = EMBED_ROWS and micro == 1 and reduce is None  # (module docstring)
        self.copies_setting = WEIGHT_COPIES  # applied at the first micro-batch
        self.low_grads = low_grads_wanted(micro)  # (module docstring)
        self.calls = 0
        self.static: dict[str, torch.Tensor] | None = None
        self.graphs = None
        self.loss_sum = self.load_sum = self.stats_sum = self.grad_norm = None

    # ------------------------------------------------------------------ pieces (eager or captured)

    def _micro_part(self) -> None:
        """Forward (the body rebuilds the block masks from the staged doc ids: captured, they are
        rebuilt on every replay), loss, backward of the staged micro-batch; sums the loss and the
        expert loads."""
        hidden, aux, load = self.body(self.static["tokens"], self.static["doc_ids"])
        out = self.loss_fn(hidden, self.static, 1.0 / self.micro)
        loss, stats = out if isinstance(out, tuple) else (out, None)
        (loss + aux / (self.micro * self.ranks)).backward()  # the aux loss: the mean over micro-batches and ranks
        self.loss_sum += loss.detach()
        self.aux_sum += aux.detach() / self.micro
        self.load_sum += load
        if stats is not None:
            if self.stats_sum is None:  # first (eager) call: the buffer's shape comes from the loss
                self.stats_sum = torch.zeros_like(stats)
            self.stats_sum += stats

    def _update_part(self) -> None:
        norm = self.opt.step(refresh_lr=False, known_sq=self.body.known_grad_sq() if self.body.grad_sq else None,
                             row_grads=self.body.embedding_row_grads(), grads=self.body.low_grads())
        self.body.mark_copies_current()  # the update wrote the kept bf16 weights too
        if self.grad_norm is None:
            self.grad_norm = torch.zeros_like(norm)
        self.grad_norm.copy_(norm)
        if self.update_biases:
            update_router_biases(self.body.model, self.load_sum)
        self.load_sum.zero_()

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None
        self.body.clear_low_grads()

    def _side_stream(self) -> torch.cuda.Stream:
        """One side stream for every eager warm-up call: the caching allocator keeps freed blocks
        per stream, so a fresh stream per call would strand the previous calls' memory."""
        if getattr(self, "_side", None) is None:
            self._side = torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        return self._side

    # ------------------------------------------------------------------ staging and capture

    def _stage(self, batch: dict) -> None:
        if self.static is None:
            self.static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
            n_moe = len(self.body.model.moe_layers())
            dev = self.static["tokens"].device
            self.loss_sum, self.aux_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)
            self.load_sum = torch.zeros(n_moe, self.body.cfg.n_experts, dtype=torch.long, device=dev)
        else:
            for k, v in self.static.items():
                if batch[k].shape != v.shape:
                    raise ValueError(f"GraphedTrainStep: micro-batch field {k!r} has shape {tuple(batch[k].shape)}, "
                                     f"the captured step has {tuple(v.shape)}: every micro-batch needs one shape")
                v.copy_(batch[k])

    def _capture(self) -> None:
        """Graphs: first micro-batch (its backward allocates the gradients in the graph's pool,
        AccumulateGrad takes them as `.grad`; every replay overwrites them: no zeroing pass), the
        other micro-batches (accumulate into those), the update. All share one memory pool."""
        torch.cuda.synchronize()
        self._clear_grads()
        mode = CAPTURE_MODE
        with CAPTURE_LOCK:
            g_first = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_first, capture_error_mode=mode):
                self._micro_part()
            pool = g_first.pool()
            g_rest = None
            if self.micro > 1:
                g_rest = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g_rest, pool=pool, capture_error_mode=mode):
                    self._micro_part()
            g_update = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_update, pool=pool, capture_error_mode=mode):
                self._update_part()
        self.graphs = (g_first, g_rest, g_update)

    def release(self) -> None:
        """Drop the captured graphs and their memory pool (the gradients live there), between steps,
        so that memory can serve eager work that did not fit beside them (the trainer's held-out
        evaluation); the next `accumulate` captures them again, without warm-up."""
        self.graphs = None
        self._clear_grads()  # the gradients of an eager warm-up step too
        self.body.embed_out = self.body.embed_tokens = None  # the embedding's row gradient with them
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def accumulate(self, batches) -> None:
        """Forward, loss and backward of every micro-batch of a step (`batches`: a dict, or a list
        of `micro` dicts of equal shapes); the sums are in `loss_sum`, `aux_sum`, `load_sum`,
        `stats_sum` until `update()`."""
        batches = [batches] if isinstance(batches, dict) else list(batches)
        if len(batches) != self.micro:
            raise ValueError(f"GraphedTrainStep: got {len(batches)} micro-batches, built for {self.micro}")
        self.calls += 1
        if self.static is None:
            # bf16 expert weights kept for the blocks that keep their activations: the forward stops
            # casting them, the update writes them (module docstring)
            self.opt.weight_copies = self.body.use_weight_copies(copies_wanted(self.body, self.copies_setting))
            self.body.use_low_grads(self.low_grads)
        if self.calls <= self.warmup:
            self._clear_grads()  # every step's first backward allocates them afresh
            side = self._side_stream()
            with torch.cuda.stream(side):
                for mb in batches:
                    self._stage(mb)
                    self._micro_part()
            torch.cuda.current_stream().wait_stream(side)
            self._reduce()
            return
        self.body.refresh_stale_copies()  # weights changed outside the step (a load): cast again, eagerly
        for i, mb in enumerate(batches):
            self._stage(mb)
            if self.graphs is None:
                self._capture()
            self.graphs[0 if i == 0 else 1].replay()
        self._reduce()

    def _reduce(self) -> None:
        """The replicas' reduction (`reduce`), eagerly on the current stream, after the step's backward."""
        if self.reduce is not None:
            grads = [p.grad for p in self.params if p.grad is not None] + list(self.body.low_grads().values())
            self.reduce(grads, self.load_sum)

    def update(self) -> None:
        """The optimizer step, the router-bias update, and zeroed sums for the next step."""
        self.opt.refresh_lr()
        if self.graphs is None:  # warm-up steps
            side = self._side_stream()
            with torch.cuda.stream(side):
                self._update_part()
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.graphs[2].replay()
        self.loss_sum.zero_()
        self.aux_sum.zero_()
        if self.stats_sum is not None:
            self.stats_sum.zero_()

    def __call__(self, batches) -> torch.Tensor:
        """One whole train step; returns its loss (CE/KD part + aux; a device tensor)."""
        self.accumulate(batches)
        loss = self.loss_sum + self.aux_sum
        self.update()
        return loss

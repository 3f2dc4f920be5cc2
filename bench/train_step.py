"""The vpMoE train step on one GPU: tokens/s, MFU, peak memory and a per-component breakdown.

Run on the GPU machine in one command with the peer (HF Afmoe at vpMoE dims), so the ratio is
taken in one run (bench/gpu_run.sh). Cases:
  (a) 20 layers, 2 x 2048 tokens   (b) 20 layers, 8 x 2048 tokens
  (c) 80 layers (the full model), 8 x 2048 tokens as 2 micro-batches of 4 x 2048
  (d) 80 layers, the stage-1 global batch: 64 x 2048 tokens per optimizer step, 16 micro-batches
Options: --ac (activation checkpointing: what lets the 80-layer model train on an 80 GB GPU), --routing,
--momentum-dtype float32 (Muon momentum in fp32; bf16 is the default), --adamw-moments float32 (the
embedding's and head's AdamW moments in fp32; bf16 is the default), --kd K (offline-KD steps).
Variants: `graphed` (vpmoe.model.graphed: per micro-batch one CUDA graph for forward + loss +
backward, one for the optimizer) and `compiled` (the same compiled blocks launched from Python).

What is measured:
- the bf16 matmul rate of this GPU (8192^3, median of repeats), the MFU denominator;
- a full train step: fused forward (vpmoe.model.fast), span-normalised CE through the fused
  chunked head+loss, backward, global-norm clip (1.0) + Muon/AdamW (vpmoe.train.optim_fast), the
  router-bias update; median of timed steps after warm-up (CUDA events around the whole step);
- model FLOPs per token: 6 x (active non-embedding params + head) + attention (12 x keys x H x D
  per layer, keys = the mean number of unmasked keys of this batch's layout): useful work only,
  no credit for recomputation, masked blocks, padding or the optimizer's Newton-Schulz;
- a breakdown: each component of the fused path alone (compiled, forward + backward, replayed as
  a CUDA graph so launch gaps drop out: GPU time) at the step's shapes, times its layer count;
  head+loss and the optimizer as run in the step. `other` = step - sum (norms, residual adds,
  embedding, the loss's host syncs, launch gaps). MoE: `permute` = the sort and the rows' gather
  (backward: the slot sum), `combine` = the slot sum (backward: the gather), `experts` = the whole
  routed part as the step runs it less those two (an estimate: they are fused into it there).
  With `--moe fused` the permute column is the sort alone and `experts` includes the gathers,
  scatters and slot sums (combine 0). Two columns are parts of others, for finding where their
  time goes: `router.logits` (the logits GEMMs, forward + backward) and `permute.routing` (the
  sort and the routing indices alone);
- `--routing balanced`: router biases balanced first (`balance_routing`), as training leaves
  them; the default keeps the random init's, whose busiest expert gets 10-30x the mean rows. Each
  row reports `load_imbalance` (max / mean rows per expert, averaged over the MoE layers);
- the optimizer alone for several Newton-Schulz chunk sizes, eager and graphed (--opt-sweep);
- `--overlap-probe` (graphed cases): the update graph replayed beside the first micro-batch's graph
  with no dependency, against each alone and the two in a row: how much of the optimizer an
  update overlapped with the next step's forward + backward could hide, at most (the update is a
  second model's: twice the memory);
- `--rows-probe` (graphed cases of one micro-batch): the step's rows as two halves, each a second
  model's first-micro-batch graph, replayed in turn and side by side on two streams, against the
  case's own graph: whether running the rows as independent halves could help (three times the
  parameter memory).
"""
from __future__ import annotations

import argparse
import gc
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.options import flex_options, literal_values, parse_opt, set_expert_kernels, set_inductor_options  # noqa: E402
from bench.step_probes import opt_sweep, overlap_probe, profile, release_graphs, rows_probe  # noqa: E402
from bench.timing import cuda_time, graph_time  # noqa: E402
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.kd.fused import auto_chunk_size, fused_span_loss  # noqa: E402
from vpmoe.kd.losses import LossSpec, SparseTarget  # noqa: E402
from vpmoe.model import dense_linear as DL  # noqa: E402
from vpmoe.model import flex as FX  # noqa: E402
from vpmoe.model import kernels as K  # noqa: E402
from vpmoe.model import moe_fused as MF  # noqa: E402
from vpmoe.model import route_fused as RS
from vpmoe.model.fast import FastBody, embedding_rows, make_block_fn, update_router_biases  # noqa: E402
from vpmoe.model import graphed as graphed_module
from vpmoe.model.graphed import GraphedTrainStep  # noqa: E402
from vpmoe.model import wgrad as wgrad_module  # noqa: E402
from vpmoe.model.model import VpMoE, positions_from_docs, route_reference  # noqa: E402
from vpmoe.model.params import count_params  # noqa: E402
from vpmoe.train.metrics import measure_matmul_flops  # noqa: E402
from vpmoe.train.optim import OptimConfig, build_optimizer  # noqa: E402
from vpmoe.train.optim_fast import FastMuonAdamW, streams_for  # noqa: E402

# layers, rows per step, seq, micro-batches per step; d = the stage-1 global batch (configs/stage1.toml:
# 64 rows of 2048 per optimizer step) on one GPU, as 16 accumulated micro-batches of 4 rows
CASES = {"a": (20, 2, 2048, 1), "b": (20, 8, 2048, 1), "c": (80, 8, 2048, 2), "d": (80, 64, 2048, 16)}


def make_batch(batch, seq, docs_per_row=4, seed=0, vocab=200000, kd_k=0):
    """Random packed rows; with kd_k > 0 also a staged teacher target as an offline KD run's
    captured step reads it (`KDObjective.staged_target`: top-k ids, log-probs, rest, gate 1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)  # documents of random lengths, packed
    for r in range(batch):
        for c in sorted(torch.randperm(seq - 1, generator=g)[: docs_per_row - 1].add(1).tolist()):
            doc_ids[r, c:] += 1
    labels = torch.roll(tokens, -1, 1)
    span_id = torch.ones(batch, seq, dtype=torch.long)
    span_id[:, seq // 2:] = 2
    span_id[:, -1] = 0
    out = dict(tokens=tokens, doc_ids=doc_ids, labels=labels, span_id=span_id)
    if kd_k:
        n = batch * seq
        lp = torch.log_softmax(torch.randn(n, kd_k + 1, generator=g) * 3, -1).sort(-1, descending=True).values
        out.update(kd_ids=torch.randint(0, vocab, (n, kd_k), generator=g), kd_logprobs=lp[:, :kd_k],
                   kd_rest=lp[:, -1], kd_label_logprob=lp[:, 0], kd_gate=torch.ones(()))
    return {k: v.cuda() for k, v in out.items()}


def flops_per_token(cfg, doc_ids) -> float:
    pos = positions_from_docs(doc_ids.cpu()).float()
    keys_global = (pos + 1).mean().item()
    keys_local = torch.clamp(pos + 1, max=cfg.window).mean().item()
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    per_key = 12 * cfg.n_heads * cfg.head_dim  # fwd 2 matmuls x 2 flops, backward twice that
    attn = per_key * (n_global * keys_global + (cfg.n_layers - n_global) * keys_local)
    return 6 * (count_params(cfg)["active_non_embedding"] + cfg.vocab_size * cfg.d_model) + attn


def load_imbalance(expert_load: torch.Tensor) -> float:
    """Mean over MoE layers of (most-loaded expert's rows / the mean): 1.0 is perfect balance."""
    load = expert_load.float()
    return (load.max(1).values / load.mean(1)).mean().item()


@torch.no_grad()
def balance_routing(model, batch, iters: int = 40) -> tuple[float, float]:
    """Router biases as training leaves them (the aux-free update balances the loads within a few
    hundred steps): `iters` sign updates with a decaying rate on two rows of `batch`, through the
    reference forward (grouped experts, no compile). A random-init model routes 10-30x more rows to
    its busiest expert than the mean (docs/performance.md), which no trained router does. Returns
    the load imbalance before and after."""
    tokens, doc = batch["tokens"][:2], batch["doc_ids"][:2]
    impls = [(b.attn.impl, getattr(b.ffn, "dispatcher", None)) for b in model.layers]
    was_training = model.training
    model.eval()  # no checkpointing
    model.set_impl(attention="reference", moe=K.experts_grouped)
    before = after = 0.0
    for i in range(iters + 1):
        load = model(tokens, doc, return_hidden=True).expert_load
        if i == 0:
            before = load_imbalance(load)
        if i == iters:
            after = load_imbalance(load)
            break
        model.update_router_biases(load, rate=2e-2 * (1e-3 / 2e-2) ** (i / max(iters - 1, 1)))  # 2e-2 -> 1e-3
    for b, (attn, moe) in zip(model.layers, impls):
        b.attn.impl = attn
        if moe is not None:
            b.ffn.dispatcher = moe
    model.train(was_training)
    return before, after


# FastMuonAdamW keyword arguments from --opt (e.g. ns_pack=4,streams=3), for an A/B against its defaults
OPT_KWARGS: dict = {}
ADAMW_MOMENTS = [OptimConfig.adamw_moments_dtype]  # optim.adamw_moments_dtype, from --adamw-moments


class Trainer:
    """Model + optimizer + one step variant."""

    def __init__(self, cfg, variant: str, ns_chunk: int, micro: int = 1, loss_chunk: int | None = None,
                 checkpoint: bool | int = False, momentum_dtype: str = OptimConfig.muon_momentum_dtype, fused_moe: bool = False,
                 lean_saves: bool = False):
        torch.manual_seed(0)
        self.cfg, self.variant = cfg, variant
        with torch.device("cuda"):  # drawn on the GPU: a host-side 6B init cost device time
            self.model = VpMoE(cfg)
        self.opt = build_optimizer(self.model, OptimConfig(muon_momentum_dtype=momentum_dtype,
                                                           adamw_moments_dtype=ADAMW_MOMENTS[0]))
        # the trainer's streams for this checkpointing, unless --opt says otherwise
        self.fopt = FastMuonAdamW(self.opt, max_grad_norm=1.0, ns_chunk=ns_chunk,
                                  **{**streams_for(checkpoint), **OPT_KWARGS})
        self.fopt.init_state()
        self.body = FastBody(self.model, static_masks=variant == "graphed", checkpoint=checkpoint, fused_moe=fused_moe,
                             lean_saves=lean_saves)
        self.loss_chunk = loss_chunk
        self.graphed = (GraphedTrainStep(self.body, self.loss, self.fopt, micro=micro)
                        if variant == "graphed" else None)

    def loss(self, hidden, batch, scale=1.0):
        """Span-normalised CE through the fused head+loss, in its sync-free (static) form for both
        variants: the graphed step needs it, and the eager one then computes the same numbers."""
        d = hidden.shape[-1]
        spec, target, gate = LossSpec(kind="ce"), None, None
        if "kd_gate" in batch:  # offline KD's gated loss (fkl + 0.2 CE), as the trainer captures it
            spec, gate = LossSpec(kind="fkl", ce_weight=0.2), batch["kd_gate"]
            target = SparseTarget(batch["kd_ids"], batch["kd_logprobs"], batch["kd_rest"], batch["kd_label_logprob"])
        # the fp32 master head, as `vpmoe train` passes it: the loss casts it to the hidden state's
        # dtype (or takes the body's kept copy: graphed.WEIGHT_COPIES) and accumulates its gradient
        # in fp32 inside the GEMM (kd/fused.py)
        loss, _ = fused_span_loss(hidden.reshape(-1, d), self.model.lm_head.weight,
                                  batch["labels"].flatten(), batch["span_id"].flatten(), spec, target,
                                  chunk_size=self.loss_chunk, static=True, kd_gate=gate,
                                  head_low=self.body.head_low())
        return loss * scale

    def step(self, micro: list[dict]):
        if self.graphed is not None:
            return self.graphed(micro)
        load, total = 0, 0.0
        for mb in micro:
            hidden, aux, lo = self.body(mb["tokens"], mb["doc_ids"])
            loss = self.loss(hidden, mb, 1.0 / len(micro)) + aux / len(micro)
            loss.backward()
            load, total = load + lo, total + loss.detach()
        self.fopt.step()
        self.opt.zero_grad(set_to_none=True)
        update_router_biases(self.model, load)
        return total


def split(batch, micro: int) -> list[dict]:
    """Micro-batches of rows (per-position KD fields [B*T, ...] split by rows too; the gate is shared)."""
    rows = batch["tokens"].shape[0]
    return [{k: v if v.dim() == 0 else v.view(rows, -1, *v.shape[1:]).chunk(micro)[i].flatten(0, 1)
             if k.startswith("kd_") else v.chunk(micro)[i] for k, v in batch.items()} for i in range(micro)]


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def routing_fields(r: K.Routing) -> tuple:
    """Every tensor a `Routing` holds (a compiled call drops the work of whatever it does not return)."""
    return r.expert, r.order, r.offsets, r.inverse, r.token


def breakdown(tr: Trainer, batch, micro: int = 1) -> dict:
    """GPU ms per step of each component alone (see the module docstring): measured on one
    micro-batch, times the micro-batch count (the optimizer runs once per step)."""
    cfg, body, dt = tr.cfg, tr.body, torch.bfloat16
    B, T = batch["tokens"].shape
    N, d, k, dev = B * T, cfg.d_model, cfg.top_k, "cuda"
    doc, local, glob = body.doc_masks(batch["doc_ids"])
    pos = positions_from_docs(doc)
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    res, how = {}, set()

    def timed(name, fn, count):
        t, h = graph_time(fn)
        res[name] = res.get(name, 0.0) + t * 1e3 * count
        how.add(h)

    def fwd_bwd(fn, inputs, params):
        """fn(*inputs) -> tensor or tuple; backward of sum(out * fixed random) into inputs + params."""
        probe = {}

        def run():
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if "g" not in probe:
                probe["g"] = [torch.randn_like(o) for o in outs]
            leaves = [t for t in list(inputs) + list(params) if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(outs, leaves, probe["g"], allow_unused=True)
        return run

    v1 = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, device=dev)
    h = torch.randn(B, T, d, device=dev, requires_grad=True)
    for layer, mask, slopes, count in ((1, local, None, cfg.n_layers - n_global), (3, glob, body.slopes, n_global)):
        if count == 0 or layer >= cfg.n_layers:
            continue
        fn = torch.compile(make_block_fn(cfg, layer, dt, True, fused_prologue=body.fused_prologue).attention, dynamic=False)
        p = body.params[layer]
        timed("attention", fwd_bwd(lambda hh: fn(p, hh, pos, doc, v1, mask, slopes)[0], [h], p.values()), count)
    L = cfg.n_moe_layers
    moe = tr.model.moe_layers()[0]
    flat = torch.randn(N, d, device=dev, requires_grad=True)

    def router(x):  # the fast path's router (bf16x3 logits where available, its selection and statistics)
        _, w, aux, _ = RS.route_with_stats(x, moe.router.weight, moe.expert_bias, cfg, B, body.bf16x3)
        return w, aux
    timed("router", fwd_bwd(torch.compile(router, dynamic=False), [flat], [moe.router.weight]), L)
    # parts of the columns above, for finding where their time goes (not in the share's sums)
    logits = torch.compile(lambda x: K.router_logits(x, moe.router.weight, body.bf16x3), dynamic=False)
    timed("router.logits", fwd_bwd(logits, [flat], [moe.router.weight]), L)
    with torch.no_grad():
        idx, w, _ = route_reference(flat, moe.router.weight, moe.expert_bias, cfg)
    w = w.detach().requires_grad_(True)
    xb = flat.detach().to(dt).requires_grad_(True)

    ex = [moe.w_up, moe.b_up, moe.w_down, moe.b_down]
    if body.fused_moe:  # the sort alone; the gather, scatter and slot sum run inside the expert kernels
        res["combine"] = 0.0
        timed("permute", lambda: K.sort_by_expert(idx, cfg.n_experts), L)
        experts = torch.compile(lambda x, ww: MF.routed_experts(x, idx, ww, *ex), dynamic=False)
        timed("experts", fwd_bwd(experts, [xb, w], ex), L)
    else:
        r = K.Routing(idx, cfg.n_experts)

        class Gather(torch.autograd.Function):  # x[token] and its slot-sum backward (inside _GatherGemm)
            @staticmethod
            def forward(ctx, x, token, inverse):
                ctx.save_for_backward(inverse)
                return x[token]

            @staticmethod
            def backward(ctx, g):
                return K.sum_slots(g, ctx.saved_tensors[0], k).to(g.dtype), None, None

        class SlotSum(torch.autograd.Function):  # the unweighted slot sum and its gather backward (in _DownSum)
            @staticmethod
            def forward(ctx, rows, inverse, token):
                ctx.save_for_backward(token)
                return K.sum_slots(rows, inverse, k)

            @staticmethod
            def backward(ctx, g):
                return g.to(dt)[ctx.saved_tensors[0]], None, None

        timed("permute.routing", torch.compile(lambda: routing_fields(K.Routing(idx, cfg.n_experts)), dynamic=False), L)

        def permute(x):  # the sort and the gather use this call's routing: the compiler keeps both
            rr = K.Routing(idx, cfg.n_experts)
            return Gather.apply(x, rr.token, rr.inverse)
        timed("permute", fwd_bwd(torch.compile(permute, dynamic=False), [xb], []), L)
        out = torch.randn(N * k, d, device=dev, dtype=dt, requires_grad=True)
        combine = torch.compile(lambda o: SlotSum.apply(o, r.inverse, r.token), dynamic=False)
        timed("combine", fwd_bwd(combine, [out], []), L)
        # the experts as the step runs them (sort, gathers, GEMMs, slot sum), less the two above
        routed = torch.compile(lambda x, ww: K.routed_experts(x, idx, ww, *ex), dynamic=False)
        timed("experts", fwd_bwd(routed, [xb, w], ex), L)
        res["experts"] -= res["permute"] + res["combine"]
    sh = [moe.shared.up.weight, moe.shared.up.bias, moe.shared.down.weight, moe.shared.down.bias]
    shared = torch.compile(lambda x: make_block_fn(cfg, 1, dt, True).ffn(body.params[1], "ffn.shared.", x),
                           dynamic=False)
    timed("shared_expert", fwd_bwd(shared, [flat], sh), L)
    hidden = torch.randn(B, T, d, device=dev, dtype=dt, requires_grad=True)
    res["head+loss"] = cuda_time(lambda: tr.loss(hidden, batch).backward(), warmup=2, iters=5) * 1e3
    keep = tr.loss_chunk
    for c in (512, 1024, 2048, 4096):  # the fused loss's rows per chunk ([c, V] logits)
        tr.loss_chunk = c
        res[f"head+loss_chunk{c}"] = cuda_time(lambda: tr.loss(hidden, batch).backward(), warmup=1, iters=3) * 1e3
    tr.loss_chunk = keep
    for p in tr.model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = {}  # the embedding's gradient as the step has it: its rows of the batch's tokens (graphed.EMBED_ROWS)
    if tr.graphed is not None and tr.body.embed_rows:
        emb = tr.model.embed.weight
        emb.grad = None
        rows = {id(emb): embedding_rows(batch["tokens"], torch.randn(*batch["tokens"].shape, d, device=dev) * 1e-3,
                                        emb.shape[0])}
    res["optimizer"] = graph_time(lambda: tr.fopt.step(refresh_lr=False, row_grads=rows), iters=5)[0] * 1e3
    res["optimizer_eager"] = cuda_time(lambda: tr.fopt.step(row_grads=rows), warmup=1, iters=3) * 1e3
    tr.opt.zero_grad(set_to_none=True)
    for k_ in list(res):
        if not k_.startswith("optimizer"):
            res[k_] *= micro
    moe_ms = sum(res[c] for c in ("router", "permute", "experts", "combine", "shared_expert"))
    res["routing_share_of_moe"] = (res["router"] + res["permute"] + res["combine"]) / moe_ms
    res["timing"] = "+".join(sorted(how))
    return res


def autotuned(which: str) -> dict:
    """The configurations the autotuner picked so far for a `moe_fused` kernel or ("wgrad") the
    experts' weight-gradient kernel: {key: config}."""
    kernel = wgrad_module._kernel if which == "wgrad" else MF._kernels.get(which)
    return {str(k): str(c) for k, c in getattr(kernel, "cache", {}).items()}


def run_case(name, variant, steps, peak, ns_chunk, do_breakdown, do_sweep, profile_dir="",
             loss_chunk=None, kd_k=0, checkpoint=False, momentum_dtype=OptimConfig.muon_momentum_dtype,
             micro_override=0, moe="grouped", routing="init", saves="default", probe=False,
             probe_rows=False) -> tuple[dict, list]:
    layers, batch_size, seq, micro = CASES[name]
    micro = micro_override or micro
    cfg = dataclasses.replace(load_model_config(ROOT / "configs/vpmoe.toml"), n_layers=layers)
    # the trainer's choice where --loss-chunk is not given (vpmoe train: the budget doubles without checkpointing)
    loss_chunk = loss_chunk or auto_chunk_size(cfg.vocab_size, torch.bfloat16, False, True, kept=not checkpoint)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"case": name, "variant": variant, "layers": layers, "batch": batch_size, "seq": seq, "micro": micro,
           "loss": f"kd-fkl-top{kd_k}" if kd_k else "ce", "activation_checkpointing": checkpoint,
           "muon_momentum": momentum_dtype, "moe": moe, "routing": routing, "saves": saves,
           "loss_chunk": loss_chunk}
    extra = []
    tr = None
    try:
        def make_trainer():
            return Trainer(cfg, variant, ns_chunk, micro, loss_chunk, checkpoint, momentum_dtype, moe == "fused",
                           saves == "lean")
        tr = make_trainer()
        row["opt_streams"] = 1 + len(tr.fopt.side_streams)  # one where blocks are checkpointed (as the trainer)
        row["opt_order"] = tr.fopt.order  # the optimizer's AdamW jobs queued first or last (FastMuonAdamW.order)
        row["gram_kernel"] = tr.fopt.gram_kernel  # FastMuonAdamW.gram_kernel (on unless --opt gram_kernel=False)
        # the experts' step as expert_muon's kernels where they apply (on unless --opt stream_experts=False)
        row["stream_experts"] = any(tr.fopt._streams(p) for p in tr.model.parameters() if p.ndim == 3)
        batches = [split(make_batch(batch_size, seq, seed=s, kd_k=kd_k), micro) for s in range(3)]
        if routing == "balanced":
            row["load_imbalance_init"], row["load_imbalance"] = balance_routing(tr.model, batches[0][0])
        else:
            row["load_imbalance"] = balance_routing(tr.model, batches[0][0], iters=0)[0]
        t0 = time.perf_counter()
        tr.step(batches[0])
        torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t0
        if tr.graphed is not None:  # what --weight-copies (auto by default) chose
            row["weight_copies"] = "on" if tr.fopt.weight_copies else "off"
            # what --low-grads (on by default: up to 4 micro-batches) gave: bf16 expert gradients
            low = "always" if graphed_module.LOW_GRADS == "always" else "on"
            row["low_grads"] = low if tr.body.low_grads() else "off"
        it = iter(range(10 ** 6))
        step = cuda_time(lambda: tr.step(batches[next(it) % 3]), warmup=3, iters=steps)
        tokens = batch_size * seq
        flops = flops_per_token(cfg, batches[0][0]["doc_ids"]) * tokens
        row.update(step_ms=step * 1e3, tokens_per_s=tokens / step, mfu=flops / step / (peak * 1e12),
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, compile=tr.body.compile_modes(),
                   **dynamo_stats())
        print(json.dumps(row), flush=True)
        print(json.dumps({"wgrad_autotuned": autotuned("wgrad")}), flush=True)  # the weight gradient's picks
        if probe or probe_rows:  # the case's own memory first: the probes build more models
            row.setdefault("peak_reserved_gib", torch.cuda.max_memory_reserved() / 2**30)
        if probe:
            row.update(overlap_probe(tr, make_trainer, batches[0]))
        if probe_rows:
            halves = split(batches[0][0], 2) if batch_size % 2 == 0 else []
            row.update(rows_probe(tr, make_trainer, batches[0], halves))
        if do_breakdown:
            release_graphs(tr)  # the components run alone; the full model needs the graphs' memory back
            parts = breakdown(tr, batches[0][0], micro)
            parts["other"] = row["step_ms"] - sum(v for k_, v in parts.items() if k_ in (
                "attention", "router", "permute", "experts", "combine", "shared_expert", "head+loss", "optimizer"))
            row.update({f"{k_}_ms" if not k_.startswith(("routing", "timing")) else k_: v for k_, v in parts.items()})
            print(json.dumps(parts), flush=True)
        if profile_dir:
            profile(tr, batches[0], profile_dir, f"{name}_{variant}")
        if do_sweep:
            extra = opt_sweep(tr)
    except torch.OutOfMemoryError as e:
        row["error"] = "out of memory: " + str(e)[:160]
        # where the memory was when it ran out: allocated vs reserved by the caching allocator, and
        # the reserved-but-unusable part (free pieces of split blocks: fragmentation)
        stats = torch.cuda.memory_stats()
        row.update(allocated_at_oom_gib=stats["allocated_bytes.all.current"] / 2**30,
                   reserved_at_oom_gib=stats["reserved_bytes.all.current"] / 2**30,
                   inactive_split_at_oom_gib=stats["inactive_split_bytes.all.current"] / 2**30)
    except Exception as e:  # noqa: BLE001 - report and go on with the next case
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row.setdefault("peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30)
    row.setdefault("peak_reserved_gib", torch.cuda.max_memory_reserved() / 2**30)
    if tr is not None:
        release_graphs(tr)
    del tr
    gc.collect()  # Trainer <-> its graphed step (the bound loss) is a cycle: free the model now
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row, extra


# the options a row names only where a run set them off their defaults (the rows' columns, in order)
MARKED_OPTIONS = ("inductor", "grad_sq", "embed_rows", "mask_tables", "wgrad_order", "route_kernel", "dense_copies", "expand_kv",
                  "opt", "expert_kernels", "flex_local", "flex_global")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="a,b,c", help="comma list of a,b,c; case:variant picks one variant")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=0,
                    help="every case at this many layers (0: the case's own); e.g. (d) at 40 layers fits an H100")
    ap.add_argument("--ns-chunk", type=int, default=256)
    ap.add_argument("--peer", default="", help="JSON lines file with the peer's results, to add the ratio")
    ap.add_argument("--breakdown", default="a", help="cases that get the component breakdown")
    ap.add_argument("--opt-sweep", action="store_true", help="NS chunk-size sweep of the optimizer on case a")
    ap.add_argument("--profile", default="", help="folder: profile each case's first variant into it")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--loss-chunk", type=int, default=0, help="rows per fused-loss chunk (0: the trainer's choice, kd/fused.auto_chunk_size)")
    ap.add_argument("--kd", type=int, default=0, help="top-k of an offline KD loss (0: CE), as a KD step")
    ap.add_argument("--ac", nargs="?", type=int, const=-1, default=0,
                    help="activation checkpointing: --ac every block (FastBody recomputes each), --ac N the first N")
    ap.add_argument("--momentum-dtype", default=OptimConfig.muon_momentum_dtype, choices=["float32", "bfloat16"],
                    help="Muon momentum storage (optim.muon_momentum_dtype)")
    ap.add_argument("--micro", type=int, default=0,
                    help="micro-batches per step for every case (0: the case's own; with --ac, fewer fit)")
    ap.add_argument("--routing", default="init", choices=["init", "balanced"],
                    help="router biases: the random init's (10-30x load imbalance) or balanced first, as training leaves them")
    ap.add_argument("--moe", default="grouped", choices=["grouped", "grouped_mm_wgrad", "gathered_wgrad", "fused"],
                    help="routed experts: the grouped-GEMM path (FastBody's default; its weight gradients from "
                         "wgrad.gathered_wgrad up to kernels.GATHERED_WGRAD_MAX_ROWS expert rows per micro-batch, "
                         "grouped GEMMs above), the same with grouped-GEMM weight gradients at every size "
                         "(FUSED_WGRAD off) or with the gathered kernel at every size (no row limit), or "
                         "moe_fused's Triton kernels")
    ap.add_argument("--grad-sq", default="on", choices=["on", "off"],
                    help="graphed one-micro-batch steps: the experts' part of the clipping norm from the weight-gradient "
                         "kernel and the embedding's from its rows of the batch's tokens (graphed.GRAD_SQ, the "
                         "default), or both read from their whole gradients (off)")
    ap.add_argument("--weight-copies", default="auto", choices=["auto", "on", "off"],
                    help="graphed steps: the kept blocks' expert weights held in bf16 and written by the update "
                         "(graphed.WEIGHT_COPIES: -2.0%% for +2.15 GiB at (a)) or cast from fp32 in every forward; "
                         "auto (the default): held where the memory is plainly spare (graphed.copies_wanted)")
    ap.add_argument("--embed-rows", default="on", choices=["on", "off"],
                    help="graphed one-micro-batch steps: the embedding's gradient as its rows of the batch's tokens, "
                         "gathered inside its AdamW pass (graphed.EMBED_ROWS, the default), or the dense [V, d] tensor")
    ap.add_argument("--low-grads", default="on", choices=["on", "off", "always"],
                    help="graphed steps: the expert weights' gradients in bf16 at up to graphed.LOW_GRADS_MAX_MICRO "
                         "micro-batches, accumulated in bf16 (graphed.LOW_GRADS, the default), at every micro-batch "
                         "count (always), or fp32 (off)")
    ap.add_argument("--wgrad-order", default="busiest", choices=["busiest", "expert"],
                    help="the gathered weight-gradient kernel's programs take the experts busiest first "
                         "(kernels.WGRAD_BUSIEST_FIRST, the default) or in id order")
    ap.add_argument("--route-kernel", default="on", choices=["on", "off"],
                    help="the router's selection, aux loss and load counts by route_fused's Triton kernels "
                         "(route_fused.ROUTE_KERNEL, the default) or as torch work for Inductor (off)")
    ap.add_argument("--dense-copies", default="on", choices=["on", "off"],
                    help="the dense weights cast once per forward by one multi-tensor copy (dense_linear.DENSE_COPIES, "
                         "the default) or by each block's compiled forward (off)")
    ap.add_argument("--expand-kv", default="on", choices=["on", "off", "local", "global"],
                    help="Flex's k/v copied out to one kv head per query head where its backward would have few "
                         "programs (flex.EXPAND_KV, the default for both layer kinds), for one kind, or never")
    ap.add_argument("--adamw-moments", default=OptimConfig.adamw_moments_dtype, choices=["float32", "bfloat16"],
                    help="the embedding's and head's AdamW moments' storage (optim.adamw_moments_dtype)")
    ap.add_argument("--mask-tables", default="runs", choices=["runs", "dense"],
                    help="Flex block tables from the document runs' block ends (flex.TABLES_FROM_RUNS, the "
                         "default) or by create_block_mask over the [B, T, T] grid (dense): the same tables")
    ap.add_argument("--inductor", default="",
                    help="torch._inductor.config settings for every compile, KEY=VALUE,... (e.g. combo_kernels=True)")
    ap.add_argument("--flex-local", default="",
                    help="FlexAttention kernel_options for the windowed layers, KEY=VALUE,...; `default`: torch's tiles; "
                         "unset: the project's choice (bench/attention.py --flex-options)")
    ap.add_argument("--flex-global", default="", help="the same for the global layers")
    ap.add_argument("--saves", default="default", choices=["lean", "default"],
                    help="what the compiled blocks keep for backward: the partitioner's default (FastBody's) or LEAN_SAVES (train.lean_saves)")
    ap.add_argument("--opt", default="", help="FastMuonAdamW keyword arguments, KEY=VALUE,... (e.g. ns_pack=4,streams=3)")
    ap.add_argument("--expert-kernels", default="", help="the experts' streaming Muon kernels' tiles and warps, "
                    "cols=N,mwarps=N,mstages=N,mregs=N,ucols=N,utiles=N,uwarps=N,ustages=N "
                    "(bench/options.set_expert_kernels); unset: the modules' defaults")
    ap.add_argument("--overlap-probe", action="store_true",
                    help="graphed cases: an optimizer step replayed beside a forward + backward (an upper bound; a second model)")
    ap.add_argument("--rows-probe", action="store_true",
                    help="graphed cases: the rows as two halves on two streams (an upper bound; two more models)")
    a = ap.parse_args()
    if a.layers < 0:
        ap.error(f"--layers {a.layers}: must be >= 0 (0 keeps each case's own)")
    if a.layers:  # a case's per-layer figures at a depth this GPU holds (the rows record the layers)
        CASES.update({k: (a.layers, *v[1:]) for k, v in CASES.items()})
    set_inductor_options(a.inductor)
    FX.FLEX_KERNEL_OPTIONS["local"] = flex_options(a.flex_local)
    FX.FLEX_KERNEL_OPTIONS["global"] = flex_options(a.flex_global, "--flex-global")
    OPT_KWARGS.update(parse_opt(a.opt))
    set_expert_kernels(literal_values(a.expert_kernels, "--expert-kernels"))
    K.FUSED_WGRAD = a.moe != "grouped_mm_wgrad"
    if a.moe == "gathered_wgrad":
        K.GATHERED_WGRAD_MAX_ROWS = 1 << 62
    graphed_module.GRAD_SQ = a.grad_sq == "on"
    graphed_module.EMBED_ROWS = a.embed_rows == "on"
    graphed_module.LOW_GRADS = {"on": True, "off": False, "always": "always"}[a.low_grads]
    FX.TABLES_FROM_RUNS = a.mask_tables == "runs"
    ADAMW_MOMENTS[0] = a.adamw_moments
    K.WGRAD_BUSIEST_FIRST = a.wgrad_order == "busiest"
    RS.ROUTE_KERNEL = a.route_kernel == "on"
    DL.DENSE_COPIES = a.dense_copies == "on"
    FX.EXPAND_KV.update({kind: a.expand_kv in ("on", kind) for kind in FX.EXPAND_KV})
    graphed_module.WEIGHT_COPIES = {"auto": "auto", "on": True, "off": False}[a.weight_copies]
    # no TF32: fp32 matmuls (the router's logits) stay fp32, as in the trainer
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    peak = measure_matmul_flops(torch.device("cuda"), torch.bfloat16) / 1e12  # the trainer's own measurement
    print(json.dumps({"bf16_matmul_tflops": peak, "device": torch.cuda.get_device_name(0)}), flush=True)
    peer = {}
    if a.peer and Path(a.peer).exists():
        for line in Path(a.peer).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                peer[(r.get("layers"), r.get("batch"), r.get("impl"))] = r.get("tokens_per_s", r.get("error"))
    cmd = "python3 bench/train_step.py " + " ".join(sys.argv[1:]) + " (run by bench/gpu_run.sh)"
    notes = f"peer (HF Afmoe grouped_mm, same run): {json.dumps({str(k): v for k, v in peer.items()})}"
    if os.environ.get("VPMOE_COMPILE_CACHE"):  # first_step_s is mostly compilation unless the caches hit
        notes += f"; compile caches: {os.environ['VPMOE_COMPILE_CACHE']} (bench/gpu_run.sh)"
    rows = []
    for spec in a.cases.split(","):
        name, _, variant = spec.partition(":")
        variants = [variant] if variant else ["graphed", "compiled"]
        for v in variants:
            row, sweep = run_case(name, v, a.steps, peak, a.ns_chunk, name in a.breakdown.split(",") and v == variants[0],
                                  a.opt_sweep and name == "a" and v == variants[0],
                                  a.profile if v == variants[0] else "", a.loss_chunk or None, a.kd,
                                  True if a.ac == -1 else a.ac, a.momentum_dtype, a.micro, a.moe, a.routing,
                                  a.saves, a.overlap_probe, a.rows_probe)
            p = peer.get((row["layers"], row["batch"], "grouped_mm"))
            if isinstance(p, float) and "tokens_per_s" in row:
                row["x_peer_grouped_mm"] = row["tokens_per_s"] / p
            row["bf16_peak_tflops"] = peak
            # always a column, as muon_momentum is: its default changed (fp32 until b30d99e, 2026-12-07, bf16 since)
            row["adamw_moments"] = a.adamw_moments
            for option in MARKED_OPTIONS:  # a column only where the run left the default
                if getattr(a, option) != ap.get_default(option):
                    row[option] = getattr(a, option)
            row.pop("compile", None)
            rows.append(row)
            if a.record:  # one section per case, written as soon as it is measured (a cut run keeps it)
                from bench.results import append_results
                append_results("train_step", cmd, [row], notes=notes)
                if sweep:
                    append_results("optimizer_ns_chunk_sweep (case a model)", cmd, sweep)
    from bench.results import markdown_table
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

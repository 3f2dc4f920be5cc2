"""The vpMoE train step on one GPU: tokens/s, MFU, peak memory and a per-component breakdown.

Run on the GPU machine in one command with the peer (HF Afmoe at vpMoE dims), so the ratio is
taken in one run (see bench/gpu_run.sh). Cases:
  (a) 20 layers, 2 x 2048 tokens   (b) 20 layers, 8 x 2048 tokens   (c) 80 layers (the full model)

What is measured:
- the bf16 matmul rate of this GPU (8192^3, median of repeats), the MFU denominator;
- a full train step: forward, span-normalised CE through the fused chunked head+loss, backward,
  grad clip, Muon+AdamW step, router-bias update; median of timed steps after warm-up (CUDA
  events around the whole step);
- model FLOPs per token: 6 x (active non-embedding params + head) + attention (12 x keys x H x D
  per layer, keys = the mean number of unmasked keys of this batch's layout), the standard
  "useful work" count: no credit for recomputation, masked blocks or padding;
- a breakdown: each component timed alone (forward + backward) at the step's shapes, times the
  number of layers that have it, so the shares show where a step goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model import kernels as K  # noqa: E402
from vpmoe.model.model import VpMoE, positions_from_docs, route_reference  # noqa: E402
from vpmoe.model.params import count_params  # noqa: E402


def cuda_time(fn, warmup=2, iters=5) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, iters=10)
    return 2 * 8192 ** 3 / t / 1e12


def make_batch(cfg, batch, seq, docs_per_row=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 200000, (batch, seq), generator=g)
    # documents of random lengths, packed: boundaries drawn per row
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        cuts = sorted(torch.randperm(seq - 1, generator=g)[: docs_per_row - 1].add(1).tolist())
        for c in cuts:
            doc_ids[r, c:] += 1
    labels = torch.roll(tokens, -1, 1)
    span_id = torch.ones(batch, seq, dtype=torch.long)
    span_id[:, seq // 2:] = 2
    span_id[:, -1] = 0
    return {k: v.cuda() for k, v in dict(tokens=tokens, doc_ids=doc_ids, labels=labels, span_id=span_id).items()}


def attention_flops_per_token(cfg, doc_ids) -> float:
    pos = positions_from_docs(doc_ids.cpu()).float()
    keys_global = (pos + 1).mean().item()
    keys_local = torch.clamp(pos + 1, max=cfg.window).mean().item()
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    per_key = 12 * cfg.n_heads * cfg.head_dim  # fwd 2 matmuls x 2 flops, backward twice that
    return per_key * (n_global * keys_global + (cfg.n_layers - n_global) * keys_local)


def build(cfg, fast=True, compile_blocks=True):
    from vpmoe.train.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = VpMoE(cfg).cuda()
    if fast:
        K.use_fast_paths(model)
    if compile_blocks:
        for block in model.layers:
            block.compile(dynamic=False)
    opt = build_optimizer(model, OptimConfig())
    return model, opt


def train_step(model, opt, batch):
    from vpmoe.kd.fused import fused_span_loss
    from vpmoe.kd.losses import LossSpec

    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch["tokens"], doc_ids=batch["doc_ids"], return_hidden=True)
    d = out.hidden.shape[-1]
    loss, _ = fused_span_loss(out.hidden.reshape(-1, d).bfloat16(), model.lm_head.weight.bfloat16(),
                              batch["labels"].flatten(), batch["span_id"].flatten(), LossSpec(kind="ce"))
    loss = loss + out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_router_biases(out.expert_load)
    return loss


def breakdown(model, opt, batch, cfg) -> dict[str, float]:
    """Each component alone, forward + backward at the step's shapes, times its layer count (ms)."""
    from vpmoe.kd.fused import fused_span_loss
    from vpmoe.kd.losses import LossSpec

    B, T = batch["tokens"].shape
    N, d = B * T, cfg.d_model
    doc = batch["doc_ids"]
    pos = positions_from_docs(doc)
    x = torch.randn(B, T, d, device="cuda", requires_grad=True)
    res = {}
    local = next(b for b in model.layers if not b.attn.is_global)
    glob = next((b for b in model.layers if b.attn.is_global), None)
    moe = model.moe_layers()[0]

    def fb(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn()
            y.float().sum().backward()
        return run

    v1 = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, device="cuda")
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    res["attention"] = cuda_time(fb(lambda: local.attn(x, pos, doc, v1)[0])) * (cfg.n_layers - n_global)
    if glob is not None:
        res["attention"] += cuda_time(fb(lambda: glob.attn(x, pos, doc, v1)[0])) * n_global
    flat = torch.randn(N, d, device="cuda", requires_grad=True)
    route = torch.compile(lambda h: route_reference(h, moe.router.weight, moe.expert_bias, cfg))
    L = cfg.n_moe_layers
    res["router"] = cuda_time(fb(lambda: route(flat)[1])) * L
    idx, w, _ = route(flat)
    idx, w = idx.detach(), w.detach().requires_grad_(True)
    k = cfg.top_k

    def permute():
        order, eor, offs = K.permute_by_expert(idx, cfg.n_experts)
        return flat.to(torch.bfloat16)[order // k]
    res["permute"] = cuda_time(fb(permute)) * L
    order, eor, offs = K.permute_by_expert(idx, cfg.n_experts)
    xs = flat.detach().to(torch.bfloat16)[order // k].requires_grad_(True)
    res["experts"] = cuda_time(fb(lambda: K.grouped_expert_ffn(xs, eor, offs, moe.w_up, moe.b_up, moe.w_down,
                                                                 moe.b_down))) * L
    out = torch.randn(N * k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def combine():
        o = out * w.flatten()[order, None].to(out.dtype)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return o[inverse].view(N, k, -1).sum(1)
    res["combine"] = cuda_time(fb(combine)) * L
    res["shared_expert"] = cuda_time(fb(lambda: moe.shared(flat))) * L
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res["head+loss"] = cuda_time(lambda: fused_span_loss(hidden, model.lm_head.weight.bfloat16(), batch["labels"].flatten(),
                                                         batch["span_id"].flatten(), LossSpec(kind="ce"))[0].backward())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    res["optimizer"] = cuda_time(lambda: opt.step(), warmup=1, iters=3)
    opt.zero_grad(set_to_none=True)
    return {k: v * 1e3 for k, v in res.items()}


def run_case(name, layers, batch_size, seq, steps, peak_tflops, do_breakdown=True) -> dict:
    cfg = dataclasses.replace(load_model_config(Path(__file__).resolve().parents[1] / "configs/vpmoe.toml"),
                              n_layers=layers)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"case": name, "layers": layers, "batch": batch_size, "seq": seq}
    try:
        model, opt = build(cfg)
        batch = make_batch(cfg, batch_size, seq)
        t_compile = time.perf_counter()
        train_step(model, opt, batch)
        torch.cuda.synchronize()
        row["first_step_s"] = time.perf_counter() - t_compile
        step = cuda_time(lambda: train_step(model, opt, batch), warmup=2, iters=steps)
        counts = count_params(cfg)
        head = cfg.vocab_size * cfg.d_model
        flops_tok = 6 * (counts["active_non_embedding"] + head) + attention_flops_per_token(cfg, batch["doc_ids"])
        tokens = batch_size * seq
        row.update(step_ms=step * 1e3, tokens_per_s=tokens / step,
                   mfu=flops_tok * tokens / step / (peak_tflops * 1e12),
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        if do_breakdown:
            parts = breakdown(model, opt, batch, cfg)
            moe_total = sum(parts[k] for k in ("router", "permute", "experts", "combine", "shared_expert"))
            row["routing_share_of_moe"] = (parts["router"] + parts["permute"] + parts["combine"]) / moe_total
            row.update({f"{k}_ms": v for k, v in parts.items()})
        del model, opt
    except torch.OutOfMemoryError as e:
        row["error"] = "out of memory: " + str(e)[:120]
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="a,b,c", help="comma list of a,b,c")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peer", default="", help="JSON lines file with the peer's results, to add the ratio")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_tflops()
    print(json.dumps({"bf16_matmul_tflops": peak}), flush=True)
    specs = {"a": (20, 2, 2048), "b": (20, 8, 2048), "c": (80, 8, 2048)}
    rows = [run_case(c, *specs[c], a.steps, peak, not a.no_breakdown) for c in a.cases.split(",")]
    peer = {}
    if a.peer and Path(a.peer).exists():
        for line in Path(a.peer).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                if "tokens_per_s" in r:
                    peer[(r["layers"], r["batch"], r["impl"])] = r["tokens_per_s"]
    for r in rows:
        p = peer.get((r["layers"], r["batch"], "grouped_mm"))
        if p and "tokens_per_s" in r:
            r["x_peer_grouped_mm"] = r["tokens_per_s"] / p
        r["bf16_peak_tflops"] = peak
    if a.record:
        from bench.results import append_results
        append_results("train_step", "bash bench/gpu_run.sh", rows,
                       notes=f"peer (HF Afmoe, same run): {json.dumps({str(k): v for k, v in peer.items()})}")


if __name__ == "__main__":
    main()

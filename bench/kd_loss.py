"""Benchmark the output-layer losses: forward + backward time and extra peak memory.

Rows: materialised CE (bf16 logits upcast to fp32, F.cross_entropy), our fused CE, our fused
sparse-target KD for every loss kind (top-k 64 + rest bucket, teacher label log-prob), our fused
dense KD (teacher hidden states + a 2880-wide teacher head, logits recomputed per chunk), and
Liger's fused linear CE when `liger_kernel` imports. Inputs: N tokens (all supervised, spans 1/2),
d = 1024, V = 201088, bf16 on CUDA.

Time: median of CUDA-event-timed iterations after warm-up (wall clock on CPU). Extra memory:
peak allocated during one forward + backward minus what was allocated before it (inputs and
targets); it includes the gradients of hidden and head weight (0.43 GB at the default sizes),
which any method must produce. Before timing, each fused row is checked against the
materialised reference on a slice of the data (value and gradients), so a fast wrong kernel
cannot post a figure.

    python bench/kd_loss.py              # GPU, full size; appends to bench/RESULTS.md
    python bench/kd_loss.py --smoke      # tiny CPU run (also appends, marked smoke)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import report  # noqa: E402
from vpmoe.kd.fused import fused_span_loss  # noqa: E402
from vpmoe.kd.losses import DenseTarget, LossSpec, SparseTarget, span_loss_reference  # noqa: E402


def make_inputs(n, d, vocab, k, d_teacher, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 1.0).to(device, dtype)
    weight = (torch.randn(vocab, d, generator=g) * 0.02 * 3).to(device, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    span = torch.randint(1, 3, (n,), generator=g).to(device)
    # a peaky teacher: top-k ids from a random distribution per row (ids need only be distinct)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(n, 64))])
    ids = ids.repeat((n + 63) // 64, 1)[:n]
    lps = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 3, -1)
    sparse = SparseTarget(ids.to(device), lps[:, :k].to(device), lps[:, k].to(device),
                          (torch.rand(n, generator=g).log() - 1).to(device))
    t_hidden = torch.randn(n, d_teacher, generator=g).to(device, dtype)
    t_head = (torch.randn(vocab, d_teacher, generator=g) * 0.03).to(device, dtype)
    dense = DenseTarget(hidden=t_hidden, head_weight=t_head)
    return hidden, weight, labels, span, sparse, dense


def materialised_ce(hidden, weight, labels, span):
    """The plain way: [N, V] logits upcast to fp32, per-token CE, span-normalised."""
    logits = (hidden @ weight.T).float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    counts = torch.stack([(span == s).sum() for s in (1, 2)]).clamp_min(1)
    coef = torch.where(span == 1, 1.0 / counts[0], 1.0 / counts[1])
    return (coef * ce).sum()


def cases(args, sparse, dense):
    rows = [("materialised CE (fp32 logits)", lambda h, w, y, s: materialised_ce(h, w, y, s)),
            ("fused CE", lambda h, w, y, s: fused_span_loss(h, w, y, s, LossSpec())[0])]
    for kind in ("fkl", "rkl", "jsd", "tvd", "cwce"):
        spec = LossSpec(kind=kind)
        rows.append((f"fused sparse {kind} (k={args.k})",
                     lambda h, w, y, s, spec=spec: fused_span_loss(h, w, y, s, spec, sparse)[0]))
    spec = LossSpec(kind="fkl")
    rows.append((f"fused dense fkl (teacher d={args.d_teacher})",
                 lambda h, w, y, s: fused_span_loss(h, w, y, s, spec, dense)[0]))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        rows.append(("Liger fused linear CE", lambda h, w, y, s: liger(w, h, y)))
    except Exception as e:  # noqa: BLE001 - optional
        print(f"(Liger not available: {type(e).__name__}: {e})")
    return rows


def check_against_reference(args, device, dtype):
    """Fused vs materialised reference on a small slice at the benchmark dtype (sanity gate)."""
    h, w, y, s, sparse, dense = make_inputs(256, args.d, min(args.vocab, 20000), args.k, 64, device, dtype, seed=1)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for spec, target in [(LossSpec(), None), (LossSpec(kind="fkl"), sparse), (LossSpec(kind="jsd"), dense)]:
        outs = []
        for fn in (span_loss_reference, fused_span_loss):
            hh, ww = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
            hh_in, ww_in = (hh, ww) if fn is span_loss_reference else (hh.to(dtype), ww.to(dtype))
            tgt = target
            if isinstance(target, DenseTarget) and fn is span_loss_reference:
                tgt = DenseTarget(hidden=target.hidden.float(), head_weight=target.head_weight.float())
            loss = fn(hh_in, ww_in, y, s, spec, tgt)[0]
            loss.backward()
            outs.append((loss.float().detach(), hh.grad, ww.grad))
        for a, b in zip(*outs):
            if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * max(1e-3, b.abs().max().item())):
                raise SystemExit(f"fused {spec.kind} does not match the reference (max diff {(a - b).abs().max():.3g})")
    print("fused losses match the materialised reference on a slice")


def measure(fn, hidden, weight, labels, span, iters, warmup, device):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def step():
        h.grad = w.grad = None
        fn(h, w, labels, span).backward()

    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        extra = float("nan")
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), extra


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--d-teacher", type=int, default=2880)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of row names to run")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.tokens, args.d, args.vocab, args.k, args.d_teacher, args.iters, args.warmup = 512, 64, 8192, 16, 96, 3, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_against_reference(args, device, dtype)
    hidden, weight, labels, span, sparse, dense = make_inputs(args.tokens, args.d, args.vocab, args.k,
                                                             args.d_teacher, device, dtype)
    rows = []
    for name, fn in cases(args, sparse, dense):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        try:
            ms, extra = measure(fn, hidden, weight, labels, span, args.iters, args.warmup, device)
        except torch.OutOfMemoryError:
            ms, extra = float("nan"), float("nan")
            torch.cuda.empty_cache()
        rows.append({"loss": name, "ms (fwd+bwd)": ms, "extra GiB": extra,
                     "Mtok/s": args.tokens / ms / 1e3 if ms == ms else float("nan")})
        print(f"{name:44s} {ms:9.2f} ms  {extra:7.3f} GiB", flush=True)
    notes = (f"N={args.tokens} d={args.d} V={args.vocab} k={args.k} {str(dtype).removeprefix('torch.')} "
             f"on {device.type}; median of {args.iters} after {args.warmup} warm-up"
             + ("; SMOKE sizes" if args.smoke else ""))
    command = "python bench/kd_loss.py" + (" --smoke" if args.smoke else "")
    report("kd_loss" + (" (smoke)" if args.smoke else ""), rows, not args.no_record, notes, command=command)


if __name__ == "__main__":
    main()

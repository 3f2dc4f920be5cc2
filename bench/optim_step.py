"""Benchmark of the optimizer step alone: FastMuonAdamW over a vpMoE of N layers, per Newton-Schulz
method, graphed and eager, plus the experts' Newton-Schulz alone.

    python bench/optim_step.py --layers 20,80 --record      (GPU; 80 layers needs ~80 GB: H200)

Gradients are random (1e-3 scale, clipping active); the step reads and writes the same state as in
training, so the figures are what `vpmoe train` and bench/train_step.py pay per optimizer step.
Variants: Newton-Schulz method (`standard` X-side, `gram` Gram-side), `ns_chunk` (matrices per
call; 256 = one expert tensor), the stored Muon momentum's dtype (`gram:256:bfloat16`) and
`ns_pack`, expert tensors whose n x n Gram-side iterations share one call (`gram:256:float32:pack=8`;
`gram_kernel=1`: each restart segment of that call as one Triton kernel, `ns_gram.py`;
fields not given keep FastMuonAdamW's defaults, packs of 4 on 3 streams, which the trainer runs),
the 2-D matrices' step compiled (the default) or eager (`gram:256:float32:matrices=eager`, the
A/B), the CUDA streams the step's pieces spread over (`gram:256:float32:streams=3`) and the
experts' step as streaming kernels (`gram:256:float32:stream=1`, `expert_muon.py`; `cols=128` sets its
momentum kernel's columns per tile, `mwarps=N` / `mstages=N` / `mregs=N` its warps, pipeline stages
and register cap, `ucols=N` / `utiles=N` / `uwarps=N` / `ustages=N` the update's: `expert_muon.CONFIGS`
and `ns_update.UPDATE_CONFIG`), and the AdamW jobs queued before the Muon ones (the default) or
after them (`gram:256:float32:order=muon_first`).
Packing several layers' tensors into one call by concatenating them (chunks of 1024 and 2048) was
measured slower and dropped (docs/LOG.md); `ns_pack` concatenates only the small n x n side.
`--timeline`: one graphed step's kernels per stream, with the time no stream and one stream alone is
busy and the kernels that run alone (bench/timeline.py).
Columns: `step_ms` (replayed from a CUDA graph, as the trainer runs it), `eager_ms`, `host_ms` (the
host's time in one eager step: launching, not waiting; near `eager_ms` when host-bound), `kernels`
(launches per step, from the profiler), `ns_ms` (one expert tensor's Newton-Schulz, 256 matrices
of 128 x 1024, compiled as in the step) and `ns_err` (its relative error against the same
iteration in float64 on a Gaussian input).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.options import EXPERT_KERNEL_KEYS, set_expert_kernels  # noqa: E402
from bench.timing import cuda_time, graph_time, host_time  # noqa: E402
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model.model import VpMoE  # noqa: E402
from vpmoe.train import expert_muon as EM  # noqa: E402
from vpmoe.train import ns_update  # noqa: E402
from vpmoe.train.optim import NS_COEFFS, OptimConfig, build_optimizer  # noqa: E402
from vpmoe.train.optim_fast import ORDERS, FastMuonAdamW, _Compiled, _muon_matrices, orthogonalise  # noqa: E402


def ns_exact(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = NS_COEFFS
    x = x.double().mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        g = x @ x.mT
        x = a * x + (b * g + c * g @ g) @ x
    return x.mT


def kernel_count(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def top_kernels(fn, rows: int = 14) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev.sort(key=lambda e: -e.self_device_time_total)
    return [f"{e.self_device_time_total:9.1f} us {e.count:4d}x {e.key[:120]}" for e in ev[:rows]]


def ns_alone(method: str) -> tuple[float, float]:
    torch.manual_seed(0)
    x = (torch.randn(256, 1024, 128, device="cuda") * 3e-4).bfloat16()
    fn = _Compiled(orthogonalise, True)
    ms = cuda_time(lambda: fn(x, 5, method), warmup=3, iters=20) * 1e3
    ref = ns_exact(x)
    err = ((fn(x, 5, method).double() - ref).norm() / ref.norm()).item()
    return ms, err


def parse_method(spec: str) -> tuple[str, int, str, dict, str]:
    """ns_method:ns_chunk[:momentum[:key=value...]] -> (method, chunk, momentum, FastMuonAdamW kwargs,
    matrices); fields not given stay FastMuonAdamW's defaults (a bare number is pack)."""
    parts = spec.split(":")
    method, chunk, momentum = parts[0], (parts[1:2] or ["256"])[0], (parts[2:3] or ["float32"])[0]
    if method not in ("gram", "standard") or not chunk.isdigit() or momentum not in ("float32", "bfloat16"):
        sys.exit(f"method {spec!r}: expected gram|standard:N[:float32|bfloat16[:key=value...]]")
    given = {}
    for field in parts[3:]:
        key, _, value = field.rpartition("=")
        key = key or "pack"
        flags, named = ("gram_kernel", "stream"), {"matrices": ("compiled", "eager"), "order": ORDERS}
        if key not in ("pack", "streams", *named, *EXPERT_KERNEL_KEYS, *flags) \
                or (key in named and value not in named[key]) or (key not in named and not value.isdigit()) \
                or (key in flags and value not in ("0", "1")):
            sys.exit(f"method {spec!r}: bad field {field!r} (pack=N, streams=N, matrices=compiled|eager, "
                     f"gram_kernel=0|1, stream=0|1, order={'|'.join(ORDERS)}, cols=N, mwarps=N, mstages=N, mregs=N, "
                     "ucols=N, utiles=N, uwarps=N, ustages=N, cprogs=N)")
        given[key] = value
    kwargs = {name: int(given[key]) for key, name in (("pack", "ns_pack"), ("streams", "streams"),
                                                      *((k, k) for k in EXPERT_KERNEL_KEYS)) if key in given}
    for key, name in (("gram_kernel", "gram_kernel"), ("stream", "stream_experts")):
        if key in given:
            kwargs[name] = given[key] == "1"
    if "order" in given:
        kwargs["order"] = given["order"]
    return method, int(chunk), momentum, kwargs, given.get("matrices", "compiled")


def timeline(step, label: str) -> None:
    """The step captured in a CUDA graph and one replay's kernels summarised per stream (bench/timeline.py):
    the time no stream or one stream alone is busy, and the kernels that run alone."""
    from bench.timeline import stream_timeline, summary_lines
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    print("\n".join(f"#  {label}: {line}" for line in summary_lines(stream_timeline(g.replay), top=16)), flush=True)


def run(layers: int, methods: list[str], top: int = 10, with_timeline: bool = False) -> list[dict]:
    # fresh compile caches per model: many variants in one process would pass Dynamo's per-function
    # limit, and calls past it run eagerly without a word (rows timed as compiled would not be)
    torch._dynamo.reset()
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=layers)
    with torch.device("cuda"):
        model = VpMoE(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for spec in methods:
        method, chunk, momentum, kwargs, matrices = parse_method(spec)
        # the streaming kernels' tiles and warps (expert_muon.CONFIGS, ns_update.UPDATE_CONFIG), for an A/B in the step
        set_expert_kernels({k: kwargs.pop(k) for k in EXPERT_KERNEL_KEYS if k in kwargs}, f"method {spec!r}")
        opt = build_optimizer(model, OptimConfig(muon_momentum_dtype=momentum))
        fast = FastMuonAdamW(opt, max_grad_norm=1.0, ns_method=method, ns_chunk=chunk, **kwargs)
        pack, streams = fast.ns_pack, len(fast.side_streams) + 1
        if matrices == "eager":  # A/B: the 2-D matrices' step as the eager code it was before 2026-12-02 (14th)
            fast._matrices = _Compiled(_muon_matrices, False)
        fast.init_state()
        torch.manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        eager = cuda_time(fast.step, warmup=2, iters=3) * 1e3  # the first calls compile
        host = host_time(fast.step) * 1e3  # near eager_ms: the eager step is host-bound
        kernels = kernel_count(fast.step)
        print("\n".join(f"#  {spec}: {line}" for line in top_kernels(fast.step, top)), flush=True)
        graphed, timing = graph_time(fast.step)
        if with_timeline:
            timeline(fast.step, spec)
        ns_ms, ns_err = ns_alone(method)
        row = dict(layers=layers, params_b=n_params / 1e9, ns_method=method, ns_chunk=chunk, ns_pack=pack,
                   matrices=matrices, streams=streams, momentum=momentum, gram_kernel=fast.gram_kernel,
                   stream_experts=fast.stream_experts, order=fast.order, momentum_config=str(EM.CONFIGS["momentum"]),
                   update_config=str(ns_update.UPDATE_CONFIG), chain_programs=EM.CONFIGS["chain"][0] or "per matrix",
                   step_ms=graphed * 1e3,
                   eager_ms=eager, host_ms=host, kernels=kernels, ns_ms=ns_ms, ns_err=ns_err, timing=timing,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
        print(row, flush=True)
        rows.append(row)
        for p in model.parameters():
            p.grad = None
        del fast, opt
        gc.collect()
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="20", help="comma-separated layer counts")
    ap.add_argument("--methods", default="gram:256,gram:256:bfloat16",
                    help="ns_method:ns_chunk[:momentum dtype[:key=value...]] (matrices per Newton-Schulz "
                         "call; float32 | bfloat16; pack=N whole expert tensors per packed Gram-side call, 1 = none "
                         "(a bare number is pack); matrices=compiled|eager, the 2-D matrices' step; streams=N; "
                         "gram_kernel=0|1, the packed segments as one Triton kernel each; "
                         "fields not given: FastMuonAdamW's defaults, which the trainer runs)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per variant (by GPU time)")
    ap.add_argument("--timeline", action="store_true",
                    help="also one graphed step's kernels per stream: idle and one-stream-alone time (bench/timeline.py)")
    a = ap.parse_args()
    for spec in a.methods.split(","):  # every spec checked before any GPU time is spent
        parse_method(spec)
    if not torch.cuda.is_available():
        sys.exit("bench/optim_step.py needs a CUDA GPU")
    rows = []
    for n in (int(x) for x in a.layers.split(",")):
        rows += run(n, a.methods.split(","), a.top, a.timeline)
    from bench.results import report
    report("optim_step", rows, a.record)


if __name__ == "__main__":
    main()

"""Tile sweep of the fused MoE kernels' forward GEMMs against `torch._grouped_mm`, at one shape:

    python bench/moe_sweep.py --tokens 65536 --record        (GPU)

For the up GEMM (x rows gathered through the sort order, [1024 -> 128] per expert) and the down
GEMM (squared ReLU on load, [128 -> 1024], scaled and scattered), each tile configuration of
`moe_fused.ROWS_CONFIGS` is timed with fp32 weights (the master weights, rounded on load) and bf16
weights, and the up GEMM also without the gather (rows materialised first); `grouped_mm` is
CUTLASS's grouped GEMM on the materialised bf16 rows. Columns: microseconds per call, TFLOP/s.
The down GEMM here runs `_rows_kernel`'s K loop (what the first version used); `moe_experts` now
runs it with `_wide_rows_kernel`, which `bench/moe.py` measures inside the whole layer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import cuda_time  # noqa: E402
from vpmoe.model import moe_fused as MF  # noqa: E402
from vpmoe.model.kernels import sort_by_expert  # noqa: E402


def routed_case(doc: str, script: str, E: int = 256, k: int = 4, options=None):
    """The MoE GEMM benchmarks' command line (--tokens, --skew, --record, and what `options(parser)`
    adds) and routing (top-k of E
    experts at random, seeded; uniform, or with --skew S each expert's popularity exp(S z), z
    normal: S = 1.5 gave a busiest expert 37x the mean at 65k tokens; a random-init model's router
    gives 10-33x):
    (args, generator, (order, offsets) sorted by expert); args.load_imbalance = max / mean rows."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--skew", type=float, default=0.0)
    ap.add_argument("--record", action="store_true")
    if options is not None:
        options(ap)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"bench/{script} needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    popularity = a.skew * torch.randn(E, device="cuda", generator=g)
    gumbel = -torch.log(-torch.log(torch.rand(a.tokens, E, device="cuda", generator=g).clamp_min(1e-20)))
    idx = (popularity + gumbel).topk(k, dim=-1).indices  # k distinct experts, drawn by popularity
    _, order, offsets = sort_by_expert(idx, E)
    load = torch.bincount(idx.flatten(), minlength=E).float()
    a.load_imbalance = (load.max() / load.mean()).item()
    return a, g, (order, offsets)


def main():
    from triton import cdiv  # here: bench/expert_gemms.py imports `routed_case` without needing Triton

    a, g, (order, offsets) = routed_case(__doc__, "moe_sweep.py")
    N, d, H, E, k = a.tokens, 1024, 128, 256, 4
    M = N * k
    x = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    weight = torch.rand(N, k, device="cuda", generator=g)
    w_up, w_down = torch.randn(E, d, H, device="cuda") / 32, torch.randn(E, H, d, device="cuda") / 11
    b_up, b_down = torch.randn(E, H, device="cuda"), torch.randn(E, d, device="cuda")
    xs = x[order // k].contiguous()
    h = torch.randn(M, H, device="cuda").bfloat16()
    flops = 2 * M * d * H
    rows = []

    def add(gemm, variant, config, fn):
        t = cuda_time(fn, warmup=3, iters=20)
        rows.append(dict(gemm=gemm, variant=variant, config=config, us=t * 1e6, tflops=flops / t / 1e12))
        print(rows[-1], flush=True)

    add("up", "grouped_mm", "cutlass", lambda: torch._grouped_mm(xs, w_up.bfloat16(), offs=offsets))
    add("down", "grouped_mm", "cutlass", lambda: torch._grouped_mm(h, w_down.bfloat16(), offs=offsets))
    add("up", "cast weights to bf16", "-", lambda: w_up.bfloat16())
    out_h, out_y = torch.empty(M, H, device="cuda", dtype=torch.bfloat16), torch.empty(M, d, device="cuda", dtype=torch.bfloat16)
    for bm, bn, bk, warps, stages in MF.ROWS_CONFIGS:
        cfg = dict(BM=bm, BK=bk, num_warps=warps, num_stages=stages)
        name = f"{bm}x{bn}x{bk} w{warps} s{stages}"
        for wdt in (torch.float32, torch.bfloat16):
            wu, wd = w_up.to(wdt), w_down.to(wdt)
            for gather, a_in in ((True, x), (False, xs)):
                bn_up = min(bn, H)

                def up(a_in=a_in, gather=gather, wu=wu, bn_up=bn_up):
                    MF._rows_kernel[(cdiv(M, bm) + E, cdiv(H, bn_up))](
                        a_in, a_in.stride(0), order, wu, *wu.stride(), b_up, b_up.stride(0), weight, out_h,
                        out_h.stride(0), offsets, out_h, 0, out_h, H, M, K=d, E=E, E_P2=E, TOPK=k, GATHER_A=gather,
                        ACT_A=False, HAS_BIAS=True, SCALE=False, SCATTER=False, DOWN_BACKWARD=False, FP32=False,
                        BN=bn_up, **cfg)
                add("up", f"{'gather' if gather else 'rows'} {str(wdt)[6:]} weights", name, up)

            def down(wd=wd):
                MF._rows_kernel[(cdiv(M, bm) + E, cdiv(d, bn))](
                    h, h.stride(0), order, wd, *wd.stride(), b_down, b_down.stride(0), weight, out_y, out_y.stride(0),
                    offsets, out_y, 0, out_y, d, M, K=H, E=E, E_P2=E, TOPK=k, GATHER_A=False, ACT_A=True,
                    HAS_BIAS=True, SCALE=True, SCATTER=True, DOWN_BACKWARD=False, FP32=False, BN=bn, **cfg)
            add("down", f"act+scatter {str(wdt)[6:]} weights", name, down)
    from bench.results import report
    report("moe_sweep", rows, a.record,
           notes=f"{N} tokens, top-{k} of {E} experts, d {d}, width {H}; flops = 2 * rows * d * width")


if __name__ == "__main__":
    main()

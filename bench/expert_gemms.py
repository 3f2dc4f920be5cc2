"""The six grouped GEMMs of the routed experts' forward and backward, alone, as `torch._grouped_mm`
(CUTLASS) runs them, with and without the bias columns:

    python bench/expert_gemms.py --tokens 65536 [--skew 1.5] --record        (GPU)

A bias carried inside a GEMM (a ones column on the input, padded to 8 columns for 16-byte rows,
and the bias as an extra weight row) makes the contraction or output width 1032 instead of 1024
(up) and 136 instead of 128 (down), off the 64/128 tile grid. This times each GEMM at both widths
(`biased`, `plain`): fwd up [M, K] @ [K, 128], fwd down [M, 136] @ [136, 1024], their input
gradients (dgrad) and weight gradients (wgrad, contraction over each expert's rows).
`kernels.routed_experts` runs all of them plain but the up weight gradient, whose extra row is the
bias gradient: the `step` total. `--skew` draws an
uneven routing (bench/moe_sweep.routed_case): the weight gradients' tiles per expert are fixed,
so the busiest expert's long contraction sets their time. Columns: microseconds per call and
TFLOP/s of the unpadded work (2 * rows * 1024 * 128).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.moe_sweep import routed_case  # noqa: E402
from bench.timing import cuda_time  # noqa: E402


def main():
    a, g, (_, offs) = routed_case(__doc__, "expert_gemms.py")
    N, d, H, E, k = a.tokens, 1024, 128, 256, 4
    M, bf = N * k, torch.bfloat16
    flops = 2 * M * d * H
    rows = []

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(bf)

    for variant, kd, kh in (("biased", d + 8, H + 8), ("plain", d, H)):
        xs, w_up, h = rand(M, kd), rand(E, kd, H), rand(M, kh)
        w_down, gy, gh = rand(E, kh, d), rand(M, d), rand(M, H)
        gemms = {
            "up fwd": lambda: torch._grouped_mm(xs, w_up, offs=offs),
            "up dgrad": lambda: torch._grouped_mm(gh, w_up.transpose(-2, -1), offs=offs),
            "up wgrad": lambda: torch._grouped_mm(xs.t(), gh, offs=offs),
            "down fwd": lambda: torch._grouped_mm(h, w_down, offs=offs),
            "down dgrad": lambda: torch._grouped_mm(gy, w_down.transpose(-2, -1), offs=offs),
            "down wgrad": lambda: torch._grouped_mm(h.t(), gy, offs=offs),
        }
        for name, fn in gemms.items():
            t = cuda_time(fn, warmup=3, iters=20)
            rows.append(dict(gemm=name, variant=variant, up_k=kd, down_k=kh, us=t * 1e6, tflops=flops / t / 1e12))
            print(rows[-1], flush=True)
    total = {v: sum(r["us"] for r in rows if r["variant"] == v) for v in ("biased", "plain")}
    total["step"] = sum(r["us"] for r in rows if (r["variant"] == "biased") == (r["gemm"] == "up wgrad"))
    summary = (f"all six: biased {total['biased']:.0f} us, plain {total['plain']:.0f} us, as the step runs them "
               f"{total['step']:.0f} us")
    print("# " + summary, flush=True)
    from bench.results import report
    report("expert_gemms", rows, a.record, notes=f"{N} tokens, top-{k} of {E} experts (skew {a.skew}: busiest expert "
           f"{a.load_imbalance:.1f}x the mean rows), d {d}, width {H}; {summary}")


if __name__ == "__main__":
    main()

"""The experts' weight gradients alone, as the train step computes them (`wgrad.gathered_wgrad`:
one Triton kernel per weight, rows read through the token index, fp32 out), per tiling
configuration:

    python bench/wgrad.py --tokens 4096 [--skew 1.0] --record        (GPU)

Per configuration (`wgrad.WGRAD_CONFIGS`, the autotuner's candidates, and a few others): the up
gradient (dW [E, 1024, 128] from x [N, 1024] read through the token index and g [N*k, 128], with the
bias gradient as one more row of tiles per expert in the same grid) and the down gradient (dW
[E, 128, 1024] from u [N*k, 128] and g [N, 1024] read through the index), each checked against fp32
torch of the same bf16 operands (`rel_err`). The floor: a plain fill of the output's 134 MB of fp32
(`fill_us`). `--tokens 4096` is the (a) step's micro-batch. On 2026-12-04 (docs/performance.md, H200) the kernel's own stores took 55-73 us of its
74-98 us against a 39 us fill; fewer pipeline stages won. Each configuration runs with fp32 and bf16
output (`out`: the master weights' gradients, or the bf16 ones `graphed.LOW_GRADS` has the kernel
write) and with the experts in id order or busiest first (`order`, `wgrad.busiest_first`); `--outs
bfloat16 --orders busiest` keeps the step's defaults only. `--sq`: each also with the tiles' sums of
squares written, as the train step's launches do (`up_sq_us`, `down_sq_us`; `graphed.GRAD_SQ`).
Init routing is skewed (`load_imbalance` 11.46 in the (a) step): `--skew 1` gives a busiest expert
16.5x the mean at 4,096 tokens, `--skew 0` 1.3x. (The bias gradient's launch of its own, timed
against the tiles with `--bias launch,tiles` until 2026-12-07, is gone: bench/RESULTS.md 09:36.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.moe_sweep import routed_case  # noqa: E402
from bench.timing import cuda_time  # noqa: E402

# (BM, BN, BK, warps, stages); the one-stage ones load straight to registers (no pipelining: a one-pass row
# loop at (a)'s ~64 rows an expert has nothing to overlap; 16-32 KB of shared memory against 48-64, sm_90)
EXTRA_CONFIGS = [(128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 2), (64, 64, 64, 4, 2),
                 (64, 128, 128, 4, 2), (64, 128, 64, 4, 1), (128, 128, 64, 8, 1), (128, 64, 64, 4, 1)]


def comma_list(*known: str):
    """An argparse type: a comma list of `known` names (argparse names the flag in its error)."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        if not set(names) <= set(known):
            raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(known)}")
        return names
    return parse


def options(ap) -> None:
    ap.add_argument("--outs", type=comma_list("float32", "bfloat16"), default="float32,bfloat16",
                    help="dW dtypes to time (comma list)")
    ap.add_argument("--orders", type=comma_list("expert", "busiest"), default="expert,busiest",
                    help="expert orders to time (comma list)")
    ap.add_argument("--sq", action="store_true", help="also time each with the sums of squares (the step's launch)")


def reference(a, b, index, offsets, gather_a: bool) -> torch.Tensor:
    """dW[e] = A'[rows of e]^T B'[rows of e] in fp32, the gathered operand read through `index`."""
    a_rows = a[index].float() if gather_a else a.float()
    b_rows = b.float() if gather_a else b[index].float()
    out = torch.empty(offsets.numel(), a.shape[1], b.shape[1], device=a.device)
    ends = offsets.tolist()
    for e, (r0, r1) in enumerate(zip([0] + ends[:-1], ends)):
        out[e] = a_rows[r0:r1].t() @ b_rows[r0:r1]
    return out


def launch(config, a, b, index, offsets, dw, db, gather_a: bool, busiest=None, sq=None) -> None:
    """`wgrad.gathered_wgrad`'s launch (one index level; the bias gradient into `db` if given)
    at one tiling configuration (BM, BN, BK, warps, stages) instead of the autotuner's pick;
    `busiest`: the experts' order (`wgrad.busiest_first`), else id order; `sq`: the sums of squares."""
    from vpmoe.model import wgrad as W

    W.launch(a, b, index, offsets, dw, db, 1, a.dtype == torch.float32, gather_a=gather_a, gather_b=not gather_a,
             config=config, busiest=busiest, sq=sq)


def main():
    from vpmoe.model import wgrad as W

    a, g, (order, offsets) = routed_case(__doc__, "wgrad.py", options=options)
    N, d, H, E, k = a.tokens, 1024, 128, 256, 4
    token = order // k  # the token of each sorted row, as `kernels.Routing` makes it
    x = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    g_up = torch.randn(N * k, H, device="cuda", generator=g).bfloat16()
    u = torch.randn(N * k, H, device="cuda", generator=g).bfloat16()
    g_down = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    cases = {"up": (x, g_up, True), "down": (u, g_down, False)}
    refs = {name: reference(aa, bb, token, offsets, ga) for name, (aa, bb, ga) in cases.items()}
    out = torch.empty(E * d * H, device="cuda")
    fill_us = cuda_time(lambda: out.fill_(1.0), warmup=3, iters=20) * 1e6
    print(f"# fill of the output's {out.numel() * 4 / 1e6:.0f} MB of fp32: {fill_us:.1f} us", flush=True)
    busiest = W.busiest_first(offsets)
    rows = []
    for config in W.WGRAD_CONFIGS + [c for c in EXTRA_CONFIGS if c not in W.WGRAD_CONFIGS]:
        for out_dtype in (getattr(torch, name) for name in a.outs):
            for order in a.orders:
                row = dict(config=str(config), listed=config in W.WGRAD_CONFIGS, out=str(out_dtype)[6:], order=order)
                for name, (aa, bb, gather_a) in cases.items():
                    dw = torch.empty(E, aa.shape[1], bb.shape[1], device="cuda", dtype=out_dtype)
                    db = torch.empty(E, bb.shape[1], device="cuda") if name == "up" else None
                    run = (lambda config=config, aa=aa, bb=bb, dw=dw, db=db, gather_a=gather_a,
                           perm=busiest if order == "busiest" else None, sq=None:
                           launch(config, aa, bb, token, offsets, dw, db, gather_a, perm, sq))
                    row[f"{name}_us"] = cuda_time(run, warmup=3, iters=20) * 1e6
                    row[f"{name}_rel_err"] = ((dw.float() - refs[name]).norm() / refs[name].norm()).item()
                    if a.sq:
                        sq = torch.empty(W.sq_shape(*dw.shape), device="cuda")
                        row[f"{name}_sq_us"] = cuda_time(lambda run=run, sq=sq: run(sq=sq), warmup=3, iters=20) * 1e6
                rows.append(row)
                print(row, flush=True)
    notes = (f"{N} tokens, top-{k} of {E} experts (skew {a.skew}: busiest expert {a.load_imbalance:.1f}x the mean "
             f"rows), d {d}, width {H}; fill of the 134 MB output {fill_us:.1f} us; `listed`: in WGRAD_CONFIGS")
    from bench.results import report
    report("wgrad", rows, a.record, notes=notes)


if __name__ == "__main__":
    main()

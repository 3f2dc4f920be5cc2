"""Benchmark of one MoE layer's routed part alone (router, sort, routed experts, combine), forward +
backward, compiled as the train step compiles it and replayed from a CUDA graph, per variant:

    python bench/moe.py --tokens 65536,8192 --record         (GPU)

- `grouped`: `kernels.routed_experts`: the dispatched rows gathered into two `torch._grouped_mm`
  at the weights' own shapes, biases in the pointwise work, gather-only slot sum; the rows
  gathered again in backward (nothing [N*k, d] kept); what the train step runs;
- `fused`: `moe_fused.routed_experts`: Triton grouped GEMMs that gather, scale and scatter rows.
Columns: ms per layer (fwd + bwd), kernels, activation memory the forward keeps for backward
(allocated after forward - before), ms per step implied for the 80-layer model's MoE layers at
this many tokens per micro-batch (no recomputation counted), and the top kernels of each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.optim_step import kernel_count, top_kernels  # noqa: E402
from bench.timing import graph_time  # noqa: E402
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model import kernels as K  # noqa: E402
from vpmoe.model import moe_fused as MF  # noqa: E402

VARIANTS = {"grouped": K.routed_experts, "fused": MF.routed_experts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="65536,8192", help="tokens per micro-batch, comma list")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe.py needs a CUDA GPU")
    cfg = load_model_config("configs/vpmoe.toml")
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.n_layers))
    E, d, H = cfg.n_experts, cfg.d_model, cfg.expert_ffn
    g = torch.Generator(device="cuda").manual_seed(0)
    p = {"ffn.router.weight": torch.randn(E, d, device="cuda", generator=g) * 0.02,
         "ffn.expert_bias": torch.zeros(E, device="cuda"),
         "ffn.w_up": torch.randn(E, d, H, device="cuda", generator=g) / d**0.5,
         "ffn.b_up": torch.randn(E, H, device="cuda", generator=g) * 0.02,
         "ffn.w_down": torch.randn(E, H, d, device="cuda", generator=g) / H**0.5,
         "ffn.b_down": torch.randn(E, d, device="cuda", generator=g) * 0.02}
    for name, t in p.items():
        t.requires_grad_(name != "ffn.expert_bias")
    leaves = [t for t in p.values() if t.requires_grad]
    rows = []
    for tokens in [int(t) for t in a.tokens.split(",")]:
        h = torch.randn(tokens, d, device="cuda", requires_grad=True)
        gy = torch.randn(tokens, d, device="cuda")
        for name in a.variants.split(","):
            experts = VARIANTS[name]

            def moe(p, h):
                idx, weight, _ = K.route_fast(h, p["ffn.router.weight"], p["ffn.expert_bias"], cfg)
                return experts(h.to(torch.bfloat16), idx, weight, p["ffn.w_up"], p["ffn.b_up"], p["ffn.w_down"],
                               p["ffn.b_down"])

            fn = torch.compile(moe, dynamic=False)

            def run():
                torch.autograd.grad([fn(p, h)], [h, *leaves], [gy])

            try:
                t, how = graph_time(run)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                y = fn(p, h)
                kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
                del y
                row = dict(variant=name, tokens=tokens, ms_per_layer=t * 1e3, kernels=kernel_count(run),
                           kept_gib=kept / 2**30, ms_per_step_80_layers=t * 1e3 * n_moe, timing=how)
                print(row, flush=True)
                print("\n".join(f"#  {name} {tokens}: {line}" for line in top_kernels(run, 10)), flush=True)
            except Exception as e:  # noqa: BLE001 - a failing variant is a result too
                print(f"# variant {name} failed: {e!r:.600}", flush=True)
                row = dict(variant=name, tokens=tokens, error=repr(e)[:160])
            rows.append(row)
    from bench.results import report
    report("moe", rows, a.record)


if __name__ == "__main__":
    main()

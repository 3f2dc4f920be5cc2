"""Benchmark of the attention sub-block alone (projections, TPA, QK-norm, GRAPE, Flex attention with
sinks, output projection), forward + backward, per layer kind, and its top kernels.

    python bench/attention.py --tokens 8192 --record         (GPU)

Variants (each compiled as the train step compiles it, replayed from a CUDA graph):
- `fused-prologue`: the train step's default on CUDA: local layers' TPA + bias + QK-norm + GRAPE
  rotation as one Triton kernel each way (`vpmoe.model.tpa_fused`);
- `torch-prologue`: the same in torch, fused by Inductor (the rank-R TPA contraction as R
  multiply-adds: pure pointwise work); what the step ran before the kernel;
- `tpa-reduction`: the earlier torch form, a product summed over the rank axis (reduction kernels
  for Inductor; measured 4% slower for the local sub-block, bench/RESULTS.md `attention`).
Global layers have no TPA; their rows are the same code in every variant.
Tried and dropped (docs/LOG.md): 64 x 64 block masks for the window-128 layers; torch 2.11's Flex
rejects them (no valid backward kernel / block size not divisible).
`--flex-options` sweeps Flex's tile options with the 128-token block masks kept
(`flex.FLEX_KERNEL_OPTIONS`, both layer kinds; `;`-separated, each `auto` (the project's choice:
smaller backward tiles for local layers on Hopper), `default` (torch's tiles) or `key=value,...`, e.g.
`bwd_BLOCK_M1=64,bwd_BLOCK_N1=64,bwd_BLOCK_M2=64,bwd_BLOCK_N2=64`): at the (a) step's 4,096 tokens
the backward's default 128-key tiles give only 64 key-block programs (2 rows x 2 KV heads x 16),
under half an H200's 132 SMs. A setting a sweep rejects is printed as a failed row.
Columns: ms per layer (fwd + bwd), kernels per layer, and the implied ms per step for the full
80-layer model at this token count.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.optim_step import kernel_count, top_kernels  # noqa: E402
from bench.options import flex_options  # noqa: E402
from bench.timing import graph_time  # noqa: E402
from bench.train_step import make_batch  # noqa: E402
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model import fast as F  # noqa: E402
from vpmoe.model import flex as FX  # noqa: E402
from vpmoe.model.model import VpMoE, positions_from_docs  # noqa: E402


def tpa_reduction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2) / a.shape[-1]


VARIANTS = {"fused-prologue": (F.tpa, True), "torch-prologue": (F.tpa, False), "tpa-reduction": (tpa_reduction, False)}


def time_variant(cfg, model, batch, name: str, spec: str, kinds_wanted: list[str], n_global: int) -> list[dict]:
    """One prologue variant's local (and, in fused-prologue, global) sub-block: fwd + bwd timed
    from a CUDA graph, with its top kernels printed; a setting Flex rejects is a failed row."""
    rows, original = [], F.tpa
    F.tpa, fused = VARIANTS[name]
    try:
        body = F.FastBody(model)
        doc, local, glob = body.doc_masks(batch["doc_ids"].cuda())
        pos = positions_from_docs(doc)
        B, T = doc.shape
        kinds = [(1, local, None, 80 - n_global)]
        if name == "fused-prologue":  # global layers: no TPA, the same code in every variant
            kinds.append((3, glob, body.slopes, n_global))
        for layer, mask, slopes, count in kinds:
            kind = "global" if slopes is not None else "local"
            if kind not in kinds_wanted:
                continue
            fn = torch.compile(F.make_block_fn(cfg, layer, torch.bfloat16, True, fused_prologue=fused).attention,
                               dynamic=False)
            p = body.params[layer]
            h = torch.randn(B, T, cfg.d_model, device="cuda", requires_grad=True)
            v1 = torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim, device="cuda")
            g = torch.randn(B, T, cfg.d_model, device="cuda")
            leaves = [h] + [t for t in p.values() if t.requires_grad]

            def run():
                out = fn(p, h, pos, doc, v1, mask, slopes)[0]
                torch.autograd.grad([out], leaves, [g], allow_unused=True)

            t, how = graph_time(run)
            kernels = kernel_count(run)
            row = dict(variant=name, flex_options=spec, kind=kind, tokens=B * T, ms_per_layer=t * 1e3,
                       kernels=kernels, ms_per_step_80_layers=t * 1e3 * count, timing=how)
            print(row, flush=True)
            if name != "tpa-reduction":
                print("\n".join(f"#  {kind}: {line}" for line in top_kernels(run)), flush=True)
            rows.append(row)
    except Exception as e:  # noqa: BLE001 - a tiling Flex rejects is a result too
        print(f"# variant {name} ({spec}) failed: {e!r:.400}", flush=True)
        rows.append(dict(variant=name, flex_options=spec, error=repr(e)[:120]))
    finally:
        F.tpa = original
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (rows of 2048)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--flex-options", default="auto", help="`;`-separated Flex kernel_options sets (see above)")
    ap.add_argument("--kinds", default="local,global", help="layer kinds to time (global only in fused-prologue)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    option_sets = [(spec, flex_options(spec, "--flex-options")) for spec in a.flex_options.split(";")]  # fail fast
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    cfg = dataclasses.replace(load_model_config("configs/vpmoe.toml"), n_layers=4)  # dense, local x2, global
    with torch.device("cuda"):
        model = VpMoE(cfg)
    batch = make_batch(a.tokens // 2048, 2048)
    n_global = sum(cfg.is_global(i) for i in range(80))
    rows = []
    for spec, options in option_sets:  # both kinds (each is timed on its own row)
        FX.FLEX_KERNEL_OPTIONS.update({"local": options, "global": options})
        torch._dynamo.reset()  # the options are read while tracing: every set compiles afresh
        for name in a.variants.split(","):
            rows += time_variant(cfg, model, batch, name, spec, a.kinds.split(","), n_global)
    FX.FLEX_KERNEL_OPTIONS.update({"local": None, "global": None})
    from bench.results import report
    report("attention", rows, a.record)


if __name__ == "__main__":
    main()

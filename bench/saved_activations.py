"""What one block of the fast path keeps for backward, tensor by tensor, as compiled for the step:

    python bench/saved_activations.py --rows 32 --record        (GPU; the (d) case's micro-batch)

A block that is not activation-checkpointed keeps what the compiled forward saves for its
backward until the backward runs; at the 80-layer step's micro-batch these decide how many blocks
fit on a GPU without recomputation (docs/performance.md). This runs the local MoE block (layer 1)
and the global MoE block (layer 3) of the locked model once under `saved_tensors_hooks` and lists
each saved tensor once (by storage): shape, dtype, bytes per token (tensors whose size grows with
the tokens) or MiB (per-layer constants: bf16 weight copies, tables). The CPU gives a different
inventory (no FlexAttention, no Triton prologue), so this is a GPU benchmark.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model import model as M  # noqa: E402
from vpmoe.model.fast import FastBody  # noqa: E402


def inventory(fn, args, B: int, T: int, k: int, params) -> tuple[list[dict], float]:
    """(rows, total bytes per token) of the tensors fn(*args) saves for backward; a tensor grows
    with the tokens if its shape has B and T, B*T or B*T*k in it."""
    tokens = B * T
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    rows, per_token = [], 0.0
    for ptr, t in seen.items():
        if ptr in param_ptrs:
            continue  # the parameters themselves: not activations
        nbytes = t.untyped_storage().nbytes()
        scales = tokens in t.shape or tokens * k in t.shape or (B in t.shape and T in t.shape)
        rows.append(dict(shape=str(tuple(t.shape)), dtype=str(t.dtype)[6:],
                         bytes_per_token=round(nbytes / tokens, 1) if scales else 0.0,
                         mib_per_layer=0.0 if scales else round(nbytes / 2**20, 1)))
        per_token += nbytes / tokens if scales else 0.0
    del out
    rows.sort(key=lambda r: (-r["bytes_per_token"], -r["mib_per_layer"]))
    return rows, per_token


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="rows of 2048 tokens per micro-batch")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--saves", default="default", choices=["lean", "default"],
                    help="the partitioner's default (FastBody's) or its LEAN_SAVES option (train.lean_saves)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/saved_activations.py needs a CUDA GPU")
    cfg = dataclasses.replace(load_model_config(ROOT / "configs/vpmoe.toml"), n_layers=4)
    torch.manual_seed(0)
    model = M.VpMoE(cfg).cuda()
    body = FastBody(model, lean_saves=a.saves == "lean")
    B, T = a.rows, cfg.max_seq_len
    tokens = B * T
    doc_ids, local, glob = body.doc_masks(torch.zeros(B, T, dtype=torch.long, device="cuda"))
    pos = M.positions_from_docs(doc_ids)
    x = torch.randn(B, T, cfg.d_model, device="cuda", requires_grad=True)
    with torch.no_grad():
        _, v_first, _, _ = body.fns[body.kind_of[0]](body.params[0], x, pos, doc_ids, None, local, None)
    all_rows, totals = [], {}
    for layer, mask, slopes in ((1, local, None), (3, glob, body.slopes)):
        kind = "local MoE" if layer == 1 else "global MoE"
        args = (body.params[layer], x, pos, doc_ids, v_first, mask, slopes)
        body.fns[body.kind_of[layer]](*args)  # compile first: the inventory is of the compiled block
        rows, per_token = inventory(body.fns[body.kind_of[layer]], args, B, T, cfg.top_k, model.parameters())
        totals[kind] = per_token
        print(f"# {kind} block: {per_token / 1024:.1f} KiB per token, {per_token * tokens / 2**30:.2f} GiB "
              f"at {tokens} tokens", flush=True)
        for r in rows:
            print(f"#   {r}", flush=True)
            all_rows.append(dict(block=kind, **r))
    from bench.results import report
    report("saved_activations", all_rows, a.record,
           notes=f"{tokens} tokens per micro-batch, saves {a.saves}; per token: "
           + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in totals.items()))


if __name__ == "__main__":
    main()

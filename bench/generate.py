"""Sampling speed (`vpmoe.model.generate`): prefill and decode through the KV cache, with the routed
experts on the reference loop against the grouped GEMMs that `generate` runs on a GPU:

    python bench/generate.py --layers 20 --rows 1,16,64 --record                       (GPU)
    python bench/generate.py --layers 2 --vocab 4096 --rows 1,8 --prompt 64 --new 16    (CPU)

The model is the locked config at `--layers` layers (random weights, bf16 on a GPU, fp32 on the
CPU); each row's prompt has `--prompt` tokens and decodes `--new` tokens greedily with no stop
token, so every run decodes the same number of steps. Columns per dispatcher: prefill seconds (a
generate call of one token: the prompt's one forward and a sample; a two-token call before it is
the warm-up) and decode tokens/s over all rows (a call of `--new` + 1 tokens less the prefill);
then the grouped path's decode rate over the loop's. `captured`: the grouped path with the
fixed-shape cache and, on a GPU, the decode step captured as a CUDA graph once per call
(`generate.CapturedDecode`; the capture's time counts in the decode rate; on the CPU the same cache
stepped eagerly); its rate over the eager grouped steps'. On-policy distillation's rollouts and the
eval's generative tasks decode this way; the figures say what a GPU-hour of rollouts buys.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append_results, markdown_table  # noqa: E402
from vpmoe.config import load_model_config  # noqa: E402
from vpmoe.model import generate as G  # noqa: E402
from vpmoe.model import kernels as K  # noqa: E402
from vpmoe.model import model as M  # noqa: E402
from vpmoe.model.model import VpMoE  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, prompts, new_tokens: int, device) -> float:
    _sync(device)
    t = time.perf_counter()
    out = G.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=(), pad_id=0)
    _sync(device)
    assert all(len(o) == new_tokens for o in out)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the locked 201,088)")
    ap.add_argument("--rows", default="1,16,64", help="comma list of batch sizes")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per row")
    ap.add_argument("--paths", default="loop,grouped,captured",
                    help="which of loop,grouped,captured to time (the loop is slow at long prompts and 80 layers)")
    ap.add_argument("--record", action="store_true",
                    help="append each batch size's row to bench/RESULTS.md as it finishes (a cut run keeps them)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "vpmoe.toml")
    cfg = dataclasses.replace(cfg, n_layers=a.layers, **({"vocab_size": a.vocab} if a.vocab else {}))
    torch.manual_seed(0)
    model = VpMoE(cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    G.GROUPED_EXPERTS_ON = ()  # the loop column runs the loop on a GPU too
    captured_on = G.CAPTURED_DECODE_ON
    paths = {"loop": (M.experts_loop, ()), "grouped": (K.experts_grouped, ()),
             "captured": (K.experts_grouped, (device.type,))}
    wanted = a.paths.split(",")
    if unknown := set(wanted) - set(paths):
        raise SystemExit(f"--paths: unknown {sorted(unknown)}; choose from {list(paths)}")
    cmd = "python bench/generate.py " + " ".join(sys.argv[1:])
    rows = []
    for n in (int(r) for r in a.rows.split(",")):
        g = torch.Generator().manual_seed(n)
        prompts = torch.randint(1, min(cfg.vocab_size, 100_000), (n, a.prompt), generator=g).tolist()
        row = {"layers": a.layers, "rows": n, "prompt": a.prompt, "new": a.new}
        for name in wanted:
            dispatcher, captured = paths[name]
            model.set_impl(moe=dispatcher)  # set on the model: the same on the CPU, where generate never swaps
            G.CAPTURED_DECODE_ON = captured
            timed_generate(model, prompts[:1], 2, device)  # warm-up (allocator, kernels' first launch)
            prefill = timed_generate(model, prompts, 1, device)
            total = timed_generate(model, prompts, a.new + 1, device)
            row[f"{name}_prefill_s"] = prefill
            row[f"{name}_decode_tok_s"] = n * a.new / max(total - prefill, 1e-9)
        for faster, slower in (("grouped", "loop"), ("captured", "grouped")):
            if faster in wanted and slower in wanted:
                row[f"{faster}_over_{slower}"] = row[f"{faster}_decode_tok_s"] / row[f"{slower}_decode_tok_s"]
        rows.append(row)
        print(markdown_table(rows[-1:]), flush=True)
        if a.record:
            append_results("generate", cmd, rows[-1:])
    G.GROUPED_EXPERTS_ON, G.CAPTURED_DECODE_ON = ("cuda",), captured_on
    model.set_impl(moe=M.experts_loop)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

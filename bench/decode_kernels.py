"""Kernels per decode step, by where the model launches them (a captured decode step replays
exactly these, so at a few rows their count, not their work, sets its time):

    python bench/decode_kernels.py --record                    (GPU: CUDA kernels, bf16)
    python bench/decode_kernels.py --layers 8 --record         (CPU: launching ops, an estimate)

One eager decode step of the model at `--layers` layers (the locked config, random weights, a
`--vocab` head) through the fixed-shape cache, after a prefill of `--prompt` tokens per row and one
warm-up step, the routed experts through the grouped GEMMs (as `generate` runs them on a GPU),
under the torch profiler with Python frames. On a GPU it counts the CUDA kernels each aten op
launched; on the CPU, where ops launch nothing, it counts the aten ops that would launch one: the
innermost aten ops, less views and allocations, with `_grouped_mm` as one (its CPU fallback loops
over experts). The CPU count is an estimate of the GPU's: composite ops (`rms_norm` among them)
split into more pieces there. Columns: the total and per layer, then the sources with the most,
each by the innermost frame under vpmoe/ (file and line of the function), or, where the profiler
keeps no Python frames (torch 2.11 on the GPU), by the innermost module around the op
(`module_ranges`: "module layers.*.ffn.router", layer indices dropped).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import report
from vpmoe.config import load_model_config
from vpmoe.model import kernels as K
from vpmoe.model.cache import StaticKVCache
from vpmoe.model.model import VpMoE

# aten ops that launch no kernel: views, metadata, allocations
NO_KERNEL = {"view", "unsqueeze", "squeeze", "transpose", "permute", "narrow", "flatten", "reshape", "slice",
             "select", "chunk", "split", "split_with_sizes", "unbind", "t", "expand", "as_strided", "alias",
             "detach", "_unsafe_view", "_reshape_alias", "view_as", "diagonal", "lift_fresh", "empty",
             "empty_like", "empty_strided", "resize_", "set_", "resolve_conj", "resolve_neg", "result_type",
             "item", "_local_scalar_dense", "contiguous", "to", "_to_copy", "clone", "numpy_T", "unflatten"}
# ... of which `to`, `_to_copy` and `clone` launch through their inner `copy_` (counted there)


def _under(e, name: str) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def _source(e) -> str:
    """The innermost Python frame under vpmoe/ of an op: from its parents in the profiler's tree (the
    CPU's torch 2.13), else from its recorded stack, else the innermost module range around it
    (`module_ranges`): on the GPU's torch 2.11 the tree had no Python parents and the stacks no
    vpmoe/ frames (every kernel read "(outside vpmoe)", 2026-12-05 and 2026-12-07)."""
    p = e.cpu_parent
    while p is not None:
        if "vpmoe/" in p.name:
            return p.name.split("vpmoe/")[-1]
        p = p.cpu_parent
    for frame in e.stack or ():  # innermost first
        if "vpmoe/" in frame:
            return frame.split("vpmoe/")[-1]
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(MODULE_RANGE):
            return p.name
        p = p.cpu_parent
    return "(outside vpmoe)"


MODULE_RANGE = "module "  # the profiler ranges `module_ranges` opens


@contextlib.contextmanager
def module_ranges(model: torch.nn.Module):
    """A profiler range around every submodule's forward, named "module <its name>" with the layer
    index dropped ("module layers.*.ffn"): user annotations (`record_function`), which the profiler's
    tree should keep where it keeps no Python frames, so kernels can be charged to the module that
    launched them (not yet run on the GPU)."""
    handles, open_ranges = [], []

    def enter(name):
        label = MODULE_RANGE + name

        def hook(module, args):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(re.sub(r"\.\d+(?=\.|$)", ".*", name))))
            handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def count(prof, cuda: bool) -> collections.Counter:
    """{source: kernels} (module docstring). On a GPU each kernel is the launching op's (the
    innermost op at the launch), and kernels launched outside any aten op (a Triton kernel called
    from Python) are counted as "(no aten op)"."""
    by_source = collections.Counter()
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:  # copies and fills included: graph nodes too
            by_source["(no aten op)"] += 1  # every kernel once; the aten ops' own take theirs back below
        if not e.name.startswith("aten::") or _under(e, "aten::_grouped_mm"):
            continue
        if cuda:
            n = len(e.kernels)
            by_source["(no aten op)"] -= n
        else:
            leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
            n = int(e.name == "aten::_grouped_mm" or (leaf and e.name[6:] not in NO_KERNEL))
        if n:
            by_source[_source(e)] += n
    return +by_source  # (drops sources at zero; below zero only if the profiler lists no device events)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=4096, help="head size (the decode step's head is one GEMM at any size)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens per row (past the 128-token window)")
    ap.add_argument("--top", type=int, default=12, help="sources listed")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "vpmoe.toml")
    cfg = dataclasses.replace(cfg, n_layers=a.layers, vocab_size=a.vocab)
    torch.manual_seed(0)
    model = VpMoE(cfg).to(device).bfloat16().eval()
    model.set_impl(moe=K.experts_grouped)
    cache = StaticKVCache(cfg, a.rows, a.prompt + 4, device)
    ids = torch.randint(1, a.vocab, (a.rows, a.prompt), device=device)
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, -1:], cache=cache)  # warm-up: lazy initialisation, first launches
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, with_stack=True) as prof, module_ranges(model):
            model(ids[:, -1:], cache=cache)
            if cuda:
                torch.cuda.synchronize()
    by_source = count(prof, cuda)
    total = sum(by_source.values())
    rows = [{"layers": a.layers, "rows": a.rows, "counted": "CUDA kernels" if cuda else "launching aten ops (CPU)",
             "per_step": total, "per_layer": total / a.layers}]
    rows += [{"source": src, "per_step": n, "per_layer": n / a.layers} for src, n in by_source.most_common(a.top)]
    report("decode_kernels", rows, a.record)


if __name__ == "__main__":
    main()

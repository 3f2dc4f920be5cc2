"""The routing's sort by expert alone: torch.sort on int64 expert ids vs the narrow keys that
`kernels.sort_by_expert` uses (uint8 for 256 experts), and the whole `kernels.Routing`:

    python bench/routing_sort.py [--tokens 16384,65536] --record        (GPU)

A radix sort makes one pass per key byte, so int64 keys take eight passes and uint8 keys one.
Columns: microseconds per call (compiled, replayed from a CUDA graph: GPU time only). Both sorts
are stable; the test suite checks that they give the same order (tests/test_kernels.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import report  # noqa: E402
from bench.timing import graph_time  # noqa: E402
from bench.train_step import routing_fields  # noqa: E402
from vpmoe.model import kernels as K  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16384,65536")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    E, k, rows = a.experts, a.top_k, []
    for n in (int(t) for t in a.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(n)
        idx = torch.rand(n, E, device="cuda", generator=g).topk(k, -1).indices  # distinct experts per token
        wide = torch.compile(lambda: torch.sort(idx.flatten(), stable=True), dynamic=False)
        narrow = torch.compile(lambda: torch.sort(idx.flatten().to(K.sort_key_dtype(E)), stable=True),
                               dynamic=False)
        routing = torch.compile(lambda: routing_fields(K.Routing(idx, E)), dynamic=False)
        assert torch.equal(wide()[1], narrow()[1]), "the two stable sorts disagree"
        row = {"tokens": n, "rows": n * k, "experts": E}
        for name, fn in (("sort_int64_us", wide), (f"sort_{str(K.sort_key_dtype(E))[6:]}_us", narrow),
                         ("routing_us", routing)):
            row[name] = graph_time(fn, iters=20)[0] * 1e6
        rows.append(row)
    report("routing_sort", rows, a.record)


if __name__ == "__main__":
    main()

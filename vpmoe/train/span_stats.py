"""Per-span loss statistics of a train or evaluation step, in one fixed layout.

A loss reports, per span id (0 none, 1 reasoning, 2 final), a token count and sums (`STAT_KEYS`:
loss, KD terms...). The trainer sums them over micro-batches on the device in one packed float64
vector (`pack_stats`: count, then every key, zeros for keys a loss does not report), so a step
needs one host read and one all-reduce for all of them; `span_report` turns the sums into the
logged per-span means and the weighted total.
"""
from __future__ import annotations

import torch

from vpmoe.kd.losses import STAT_KEYS

N_STATS = 1 + len(STAT_KEYS)  # count + sums, each [3] by span id


def pack_stats(stats: dict) -> torch.Tensor:
    """Fixed layout (count, then every STAT_KEY; zeros for keys this loss does not report)."""
    zeros = torch.zeros(3, dtype=torch.float64, device=stats["count"].device)
    return torch.cat([stats["count"].double()] + [stats.get(k, zeros).double() for k in STAT_KEYS])


def unpack_stats(packed: torch.Tensor) -> dict:
    parts = packed.view(N_STATS, 3)
    return {"count": parts[0], **{k: parts[i + 1] for i, k in enumerate(STAT_KEYS)}}


def span_report(stats: dict, w_r: float, w_f: float, prefix: str = "") -> dict:
    """Global per-span means and the weighted total (an empty span contributes 0)."""
    out, total = {}, 0.0
    for span, name, weight in ((1, "reasoning", w_r), (2, "final", w_f)):
        n = float(stats["count"][span])
        out[f"{prefix}tokens/{name}"] = int(n)
        if n > 0:
            mean = float(stats["loss_sum"][span]) / n
            out[f"{prefix}loss/{name}"] = mean
            total += weight * mean
    out[f"{prefix}loss"] = total
    return out

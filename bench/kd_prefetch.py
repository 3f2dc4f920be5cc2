"""Host cost of offline KD per train step, and how much of it the step prefetcher hides.

A synthetic teacher cache in the real format (`vpmoe.kd.cache.ShardWriter`: rice ids, 5-bit
log-probs, k = 64 by default) over rows of T positions, 3/4 of them supervised; for each
micro-batch of B rows, `KDObjective.staged_target` reads, decodes, checks the tokens' crc32 and
stages the target over all B*T positions, as the trainer's prefetch thread does.

Columns: `stage_ms` (one micro-batch, median), `pos_per_s` (supervised positions decoded per
second), then for a simulated device step of `device_ms` (the main thread waits, as it does for
a GPU step; `time.sleep` releases the GIL as a CUDA sync does) the loop's time per step without
(`sync_ms` = stage + device) and with the prefetch thread (`prefetch_ms`), and the trainer's
`data_wait_ms`. An eagerly launched GPU step keeps the main thread busier (Python launches
kernels), so the eager figure lies between the two.

    python bench/kd_prefetch.py [--rows 8] [--seq 2048] [--k 64] [--record]     (CPU)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import report  # noqa: E402
from vpmoe.kd.cache import MANIFEST, CacheSpec, ShardWriter, new_manifest, write_json  # noqa: E402
from vpmoe.kd.losses import LossSpec  # noqa: E402
from vpmoe.kd.objective import KDConfig, KDObjective  # noqa: E402
from vpmoe.train.prefetch import StepPrefetcher  # noqa: E402

V = 201088


def build_cache(out: Path, rows: int, seq: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of `rows` rows; returns (tokens [rows, seq], loss_mask [rows, seq])."""
    rng = np.random.default_rng(seed)
    spec = CacheSpec(top_k=k)
    tokens = rng.integers(0, V, (rows, seq))
    mask = np.zeros((rows, seq), dtype=np.int64)
    mask[:, seq // 4:] = 1
    writer = ShardWriter(out, "shard_00000", spec)
    for r in range(rows):
        n = int(mask[r].sum())
        logits = np.sort(rng.standard_normal((n, k + 1)) * 3, axis=1)[:, ::-1]
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ids = np.sort(rng.choice(V, size=(n, k), replace=True), axis=1)
        ids = np.stack([np.unique(np.concatenate([row, np.arange(k)]))[:k] for row in ids])  # k distinct ids
        writer.add_row(tokens[r], ids, lp[:, :k].astype(np.float32), lp[:, 0].astype(np.float32),
                       lp[:, k].astype(np.float32))
    writer.finish()
    write_json(out / MANIFEST, new_manifest(spec, {"id": "synthetic"}, 1.0, "none", "none", [("shard_00000", rows)]))
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device-ms", default="100,400", help="simulated device step times")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_rows = a.rows * 4
        tokens, mask = build_cache(Path(tmp), n_rows, a.seq, a.k)
        cfg = KDConfig(mode="offline", cache=tmp, loss=LossSpec(kind="fkl"))
        objective = KDObjective(cfg)

        def batch(i):
            idx = torch.arange(i * a.rows, (i + 1) * a.rows) % n_rows
            return {"tokens": tokens[idx], "loss_mask": mask[idx], "labels": tokens[idx].roll(-1, 1),
                    "span_id": mask[idx] * 2, "sample_index": idx}

        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            objective.staged_target(batch(i), True)
            times.append(time.perf_counter() - t0)
        stage = statistics.median(times[1:])
        positions = int(mask[:a.rows].sum())
        rows = []
        for device_ms in (float(x) for x in a.device_ms.split(",")):
            def produce(step):
                return [objective.staged_target(batch(step), True)], {}

            t0 = time.perf_counter()
            for step in range(a.steps):
                produce(step)
                time.sleep(device_ms / 1e3)
            sync = (time.perf_counter() - t0) / a.steps
            waits = []
            t0 = time.perf_counter()
            with StepPrefetcher(produce, 0, a.steps) as pre:
                for step in range(a.steps):
                    waits.append(pre.get(step)[2])
                    time.sleep(device_ms / 1e3)
            pref = (time.perf_counter() - t0) / a.steps
            rows.append({"rows": a.rows, "seq": a.seq, "k": a.k, "positions": positions, "stage_ms": stage * 1e3,
                         "pos_per_s": positions / stage, "device_ms": device_ms, "sync_ms": sync * 1e3,
                         "prefetch_ms": pref * 1e3, "data_wait_ms": statistics.median(waits[1:]) * 1e3})
    report("kd_prefetch", rows, a.record,
           notes="synthetic cache in the real format; one micro-batch per step; see bench/kd_prefetch.py for columns")


if __name__ == "__main__":
    main()

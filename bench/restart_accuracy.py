"""How close each Gram-side Newton-Schulz form comes to a float64 iteration of the same update:
the packed torch path (the restart from the big side, `optim_fast.gram_newton_schulz` with its
n x n side in fp16) against the streaming experts' (the restart from the small side,
`expert_muon`'s reference functions: `momentum_gram_reference`, `gram_chain_reference`,
`ns_update.qx_update_reference`: the kernels' roundings in torch).

    python bench/restart_accuracy.py --record            (CPU or GPU)

Inputs: bf16 matrices of vpMoE's expert shape (128 x 1024) with four spectra: Gaussian, singular
values log-spaced 1..1e-2 and 1..1e-5, and rank 4 plus 1e-3 noise. Columns: the relative
Frobenius error of each form's five-step result against float64 (`big_side`, `small_side`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import report  # noqa: E402
from vpmoe.train import expert_muon as EM  # noqa: E402
from vpmoe.train import ns_update  # noqa: E402
from vpmoe.train.optim import NS_COEFFS, newton_schulz  # noqa: E402
from vpmoe.train.optim_fast import gram_newton_schulz  # noqa: E402


def spectrum(kind: str, batch: int, gen: torch.Generator, m: int = 128, n: int = 1024) -> torch.Tensor:
    g = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        return g
    u, _, v = torch.linalg.svd(g, full_matrices=False)
    sv = {"log 1..1e-2": torch.logspace(0, -2, m, dtype=torch.float64),
          "log 1..1e-5": torch.logspace(0, -5, m, dtype=torch.float64),
          "rank 4 + 1e-3": torch.cat([torch.ones(4, dtype=torch.float64), torch.full((m - 4,), 1e-3, dtype=torch.float64)])}[kind]
    return (u * sv) @ v * 10


def small_side(u: torch.Tensor) -> torch.Tensor:
    """The streaming path's reference functions on U (momentum 0, so U is the input itself)."""
    a, b, c = NS_COEFFS
    one = torch.ones((), device=u.device)
    u, r0, scale = EM.momentum_gram_reference(u, torch.zeros_like(u, dtype=torch.float32), one, 0.0, False, False)
    hi, lo = EM.gram_chain_reference(r0, scale, 2, 3, a, b, c)
    out = torch.zeros_like(u, dtype=torch.float32)
    ns_update.qx_update_reference(out, hi, u, one, one, False, lo)
    return out.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=6, help="matrices per spectrum")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("gaussian", "log 1..1e-2", "log 1..1e-5", "rank 4 + 1e-3"):
        u = spectrum(kind, a.batch, gen).to(device=device, dtype=torch.bfloat16)
        exact = newton_schulz(u.double(), 5, dtype=torch.float64)
        big = gram_newton_schulz(u, 5, small_dtype=torch.float16)
        row = {"spectrum": kind}
        for name, out in (("big_side", big), ("small_side", small_side(u))):
            row[name] = ((out.double() - exact).norm() / exact.norm()).item()
        rows.append(row)
        print(row, flush=True)
    report("restart_accuracy", rows, a.record,
           notes=f"{a.batch} matrices of 128 x 1024 per spectrum, bf16 inputs, on {device}")


if __name__ == "__main__":
    main()

"""One expert tensor's Muon step: the streaming kernels (vpmoe/train/expert_muon.py) per launch
configuration against the packed torch path (`FastMuonAdamW(stream_experts=False)`).

    python bench/expert_muon.py --record            (GPU)

Shapes: vpMoE's expert tensors, 256 matrices of 1024 x 128 (the up projection, orthogonalised as
its transpose) and 128 x 1024 (down). Columns: `path` (`kernels` or `torch`: `_muon_pre`, the
compiled packed Gram-side Newton-Schulz with its Gram kernel, `_muon_post`, one tensor per call),
the kernels' configurations ((columns, warps, stages, register cap) of the momentum kernel; (columns, tiles per
program, warps, stages) of the update), the whole step's time (`step_us`: replayed from a CUDA graph of 10 calls,
median of 20 replays, per call; `timing` says "eager" where capture failed), each
kernel alone (`momentum_us`, `chain_us`: the n x n chain with its restart, `update_us`; kernels
path only) and the streaming kernels' bandwidth by the bytes they must move (`momentum_tbs`: 12
bytes per parameter, `update_tbs`: 12). The `hybrid` rows (a probe, see `paths`; not ahead on an
H200, 2026-12-06): the whole step and its momentum pass with the cuBLAS Gram (`momentum_us`;
`momentum_tbs` by 14 bytes per parameter). `--top N` lists each path's largest kernels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import report  # noqa: E402
from bench.timing import graph_time  # noqa: E402
from vpmoe.train import expert_muon as EM  # noqa: E402
from vpmoe.train import ns_update  # noqa: E402
from vpmoe.train.optim import NS_COEFFS  # noqa: E402
from vpmoe.train.optim_fast import _Compiled, _muon_post, _muon_pre, gram_newton_schulz_packed  # noqa: E402

# (momentum kernel's (columns, warps, stages, register cap), the update's (columns, tiles per program, warps, stages));
# the first pair is the modules' default (since 2026-12-06 03:15), the second the one before. At 2
# stages Triton pipelines the momentum kernel's loads through one shared-memory buffer, so the next
# tile's copy waits for this tile's math; 3 stages give two buffers (the TTGIR on the CPU, Triton 3.9).
# Update programs of several tiles load W one tile ahead while the pipeliner streams x. The others
# (2026-12-06 07:40): wider contiguous runs in the [256, 128, 1024] tensor's rows (256 B of fp32 at
# 64 columns), whose momentum kernel slowed with every narrower tile (245 us at 16 columns against
# 157 at 64, H100 06:09) where the transposed tensor's did not; and fewer tiles per update program,
# a matrix's column programs adjacent in launch order (so they run side by side on its rows). One tile
# a program was the fastest update alone (H100, 07:25) but slower in the 20-layer optimizer step (07:28)
CONFIGS = [((64, 16, 3, 0), (64, 16, 8, 3)), ((64, 16, 2, 0), (64, 1, 8, 3)), ((128, 16, 2, 0), (64, 16, 8, 3)),
           ((64, 16, 3, 0), (64, 1, 8, 3)), ((64, 16, 3, 0), (64, 2, 8, 3)), ((64, 16, 3, 0), (64, 4, 8, 3)),
           ((64, 16, 3, 0), (128, 1, 8, 3)), ((64, 16, 3, 0), (128, 1, 16, 3)), ((64, 16, 3, 0), (32, 1, 8, 3))]


def case(shape, seed=0):
    torch.manual_seed(seed)
    g = (torch.randn(shape, device="cuda") * 1e-3).bfloat16()
    return dict(g=g, buf=torch.randn(shape, device="cuda") * 1e-3, w=torch.randn(shape, device="cuda") * 0.02,
                low=torch.empty(shape, device="cuda", dtype=torch.bfloat16),
                coef=torch.tensor(0.9, device="cuda"), decay=torch.tensor(0.9999, device="cuda"),
                step=torch.tensor(-0.02, device="cuda"))


def paths(t, transposed: bool) -> tuple[dict, object]:
    """One step of each path on the tensors of `case`: the packed torch path (compiled), the
    streaming kernels (`expert_muon.CONFIGS` and `ns_update.UPDATE_CONFIG` as they stand at each
    call) and a probe, `hybrid`: the packed path's momentum pass and a cuBLAS Gram in place of
    `momentum_gram`, then the kernels' chain and update (the same values as the kernels' step up
    to the Gram's summation order). Returns (the steps by path, the hybrid's momentum half alone)."""
    pre, ns, post = _Compiled(_muon_pre, True), _Compiled(gram_newton_schulz_packed, True), _Compiled(_muon_post, True)
    a, b, c = NS_COEFFS

    def torch_step():
        u = pre(t["g"], t["buf"], t["coef"], 0.95, True, torch.bfloat16)
        post(t["w"], ns([u], 5, kernel=True)[0], t["decay"], t["step"], t["low"])

    def kernels_step():
        EM.muon_step(t["g"], t["buf"], t["w"], t["low"], t["coef"], 0.95, True, t["decay"], t["step"], 5)

    def hybrid_momentum():
        u = pre(t["g"], t["buf"], t["coef"], 0.95, True, torch.bfloat16)
        return (u, *EM.normalised_gram(u, transposed))

    def hybrid_step():
        u, r, scale = hybrid_momentum()
        hi, lo = EM.gram_chain(r, scale, 2, 3, a, b, c)
        ns_update.qx_update(t["w"], hi, u.mT if transposed else u, t["decay"], t["step"], transposed, t["low"], lo)
    return {"torch": torch_step, "kernels": kernels_step, "hybrid": hybrid_step}, hybrid_momentum


REPEAT = 10  # calls per captured graph, so the replay's own launch is spread over them


def replayed_us(fn) -> tuple[float, str]:
    """Microseconds of GPU time per call of fn, replayed from a CUDA graph of REPEAT calls, and how it
    was timed ("graph", or "eager" where capture failed). Until 2026-12-06 each launch was timed
    eagerly with CUDA events, which read about twice the kernel times of the 20-layer step's profile
    (H200, 03:09-03:11), most likely the host's dispatch of the custom op and its Triton launch
    (the GPU idles between the start event and the kernel); a graph replay leaves only GPU time."""
    def calls():
        for _ in range(REPEAT):
            fn()
    seconds, how = graph_time(calls, iters=20)
    return seconds / REPEAT * 1e6, how


def time_kernels(t, step, transposed: bool) -> dict:
    """The kernels' whole step (`step`) and each of its three launches alone, in microseconds."""
    a, b, c = NS_COEFFS
    whole, how = replayed_us(step)
    u, r, scale = EM.momentum_gram(t["g"], t["buf"], t["coef"], 0.95, True, transposed, 1e-7)
    hi, lo = EM.gram_chain(r, scale, 2, 3, a, b, c)
    uo = u.mT if transposed else u
    times = dict(momentum_us=lambda: EM.momentum_gram(t["g"], t["buf"], t["coef"], 0.95, True, transposed, 1e-7),
                 chain_us=lambda: EM.gram_chain(r, scale, 2, 3, a, b, c),
                 update_us=lambda: ns_update.qx_update(t["w"], hi, uo, t["decay"], t["step"], transposed, t["low"], lo))
    got = {name: replayed_us(fn) for name, fn in times.items()}
    hows = {how, *(h for _, h in got.values())}
    return dict(step_us=whole, **{name: us for name, (us, _) in got.items()}, timing="/".join(sorted(hows)))


def print_top(steps: dict, transposed: bool, rows: int) -> None:
    """Each path's largest kernels for one step (the kernels at the modules' defaults)."""
    from bench.optim_step import top_kernels
    for name, fn in steps.items():
        fn()
        print(f"# {name} path, transposed={transposed}: kernels of one step")
        print("\n".join(top_kernels(fn, rows)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="also list each path's N largest kernels (one step, profiler)")
    a = ap.parse_args()
    rows = []
    for shape in ((256, 1024, 128), (256, 128, 1024)):
        n = torch.Size(shape).numel()
        t = case(shape)
        steps, hybrid_momentum = paths(t, shape[1] > shape[2])
        step_us, how = replayed_us(steps["torch"])
        rows.append(dict(shape="x".join(map(str, shape)), path="torch", step_us=step_us, timing=how))
        print(rows[-1], flush=True)
        (momentum_us, how), (step_us, how_step) = replayed_us(hybrid_momentum), replayed_us(steps["hybrid"])
        rows.append(dict(shape="x".join(map(str, shape)), path="hybrid", momentum_us=momentum_us, step_us=step_us,
                         momentum_tbs=14 * n / momentum_us / 1e6, timing="/".join(sorted({how, how_step}))))
        print(rows[-1], flush=True)
        if a.top:
            print_top(steps, shape[1] > shape[2], a.top)
        for mom, upd in CONFIGS:
            EM.CONFIGS["momentum"] = mom
            ns_update.UPDATE_CONFIG = upd
            config = dict(momentum=str(mom), update=str(upd))
            try:
                got = time_kernels(t, steps["kernels"], shape[1] > shape[2])
            except Exception as e:  # noqa: BLE001 - a configuration that does not launch is a row, not a stop
                rows.append(dict(shape="x".join(map(str, shape)), path="kernels", **config, error=repr(e)[:120]))
                continue
            rows.append(dict(shape="x".join(map(str, shape)), path="kernels", **config, **got,
                             momentum_tbs=12 * n / got["momentum_us"] / 1e6, update_tbs=12 * n / got["update_us"] / 1e6))
            print(rows[-1], flush=True)
    report("expert_muon", rows, a.record,
           notes="one expert tensor's Muon step; the torch path one tensor per call (the step packs 4)")


if __name__ == "__main__":
    main()

"""Registers and spills of the project's Triton kernels for sm_90, per autotuning configuration,
compiled on any machine: no GPU needed (the Triton wheel ships ptxas).

    python bench/kernel_registers.py --record            (CPU or GPU machine)

Why: a kernel's registers per thread decide how many warps an SM keeps resident, and so how much
memory latency it hides. The attention prologue's first backward used 191-255 registers in every
configuration (spilling in half of them) and ran at ~15x its memory traffic; this is how that was
found and how its rewrite was checked before any GPU time (docs/performance.md). Columns: kernel,
configuration, registers per thread, spill stores/loads (bytes), stack frame (bytes), and the
resident warps per SM that the registers allow (65,536 registers per SM, 64 warps at most).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import append_results  # noqa: E402
from vpmoe.kd import row_kernels as RK  # noqa: E402
from vpmoe.model import moe_fused as MF  # noqa: E402
from vpmoe.model import tpa_fused as TF  # noqa: E402
from vpmoe.model import wgrad as W  # noqa: E402
from vpmoe.train import expert_muon as EM  # noqa: E402
from vpmoe.train import ns_update  # noqa: E402
from vpmoe.train import ns_gram as NG  # noqa: E402

DIMS = [8, 2, 128, 4, 2]  # vpMoE's local layers: q heads, kv heads, head_dim, TPA ranks


def ptxas_report(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, num_stages: int = 3) -> dict:
    """Compile `kernel` for sm_<arch> and read ptxas -v: registers, spills, stack."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                        constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    text = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        for _ in range(2):
            ptx.write_text(text)
            done = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            # a Triton newer than its bundled ptxas (3.9 writes PTX 9.4, its ptxas reads <= 8.8): the
            # same PTX labelled with the version ptxas reads, which compiles where no newer feature is used
            older = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", done.stderr)
            if done.returncode == 0 or not older:
                break
            text = re.sub(r"^\.version [\d.]+", f".version {older.group(1)}", text, count=1, flags=re.M)
        if done.returncode:
            raise RuntimeError(f"ptxas failed: {done.stderr[-1500:]}")
        info = done.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    stack = re.search(r"(\d+) bytes stack frame", info)
    warps = min(64, (65536 // (regs * 32 * num_warps)) * num_warps)
    return {"registers": regs, "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
            "stack_bytes": int(stack.group(1)), "warps_per_sm": warps}


def prologue_cases():
    starts = TF._column_starts(DIMS)
    H, G, D, Rq, Rkv = DIMS
    common = dict(H=H, G=G, D=D, RQ=Rq, RKV=Rkv, **starts)
    pointers = ["proj_ptr", "qb_ptr", "kb_ptr", "vb_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr"]
    types = ["*bf16"] * 6 + ["*fp32"] * 2
    fwd = dict(zip(pointers + ["q_ptr", "k_ptr", "v_ptr"], types + ["*bf16", "*bf16", "*fp32"]))
    fwd.update(N="i32", T="i32", stride_n="i32", eps="fp32")
    for bn, w in TF.FORWARD_CONFIGS:
        yield "tpa prologue forward", f"{bn} tokens, {w} warps", TF._forward_kernel, fwd, dict(common, BN=bn), w
    bwd = dict(zip(pointers + ["gq_ptr", "gk_ptr", "gv_ptr", "gproj_ptr", "gcos_ptr", "gsin_ptr", "part_ptr"],
                   types + ["*bf16", "*bf16", "*fp32", "*bf16", "*fp32", "*fp32", "*fp32"]))
    bwd.update(N="i32", T="i32", stride_n="i32", stride_g="i32", eps="fp32")
    bwd.update({f"{g}_s{a}": "i32" for g in ("gq", "gk", "gv") for a in ("b", "h", "t")})
    part = (H + 2 * G) * D + 2 * D
    for bn, blocks, w in TF.BACKWARD_CONFIGS + TF.SHORT_BACKWARD_CONFIGS:
        yield ("tpa prologue backward", f"{bn} tokens x {blocks} blocks, {w} warps", TF._backward_kernel, bwd,
               dict(common, PART=part, BN=bn, BLOCKS=blocks), w)


def row_cases(vocab: int = 201088):
    block = min(RK.BLOCK, 1 << (vocab - 1).bit_length())
    yield ("loss row logsumexp", f"{block}-column blocks, 8 warps", RK._row_lse_kernel,
           {"z_ptr": "*bf16", "max_ptr": "*fp32", "sum_ptr": "*fp32", "stride": "i32"},
           dict(V=vocab, SEGMENT=block * RK.SEGMENT_BLOCKS, BLOCK=block), 8)
    yield ("loss rest gradient", f"{block}-column blocks, 8 warps", RK._rest_grad_kernel,
           {"z_ptr": "*bf16", "lse_ptr": "*fp32", "scale_ptr": "*fp32", "V": "i32", "stride": "i32"},
           dict(BLOCK=block), 8)


# the fused MoE kernels' four GEMMs per direction at vpMoE's dims (d 1024, width 128, 256 experts, top-4)
MOE_ROWS = {  # name: (A dtype, out dtype, N, K, flags)
    "moe up (gather x)": ("bf16", "bf16", 128, 1024, dict(GATHER_A=True, HAS_BIAS=True)),
    "moe down (act, scale, scatter)": ("bf16", "bf16", 1024, 128, dict(ACT_A=True, HAS_BIAS=True, SCALE=True, SCATTER=True)),
    "moe down backward (gather gy)": ("fp32", "bf16", 128, 1024, dict(GATHER_A=True, DOWN_BACKWARD=True)),
    "moe up dgrad (scatter)": ("bf16", "bf16", 1024, 128, dict(SCATTER=True)),
}
MOE_WGRAD = {  # name: (A dtype, B dtype, flags)
    "moe down wgrad (act, gather gy)": ("bf16", "fp32", dict(ACT_A=True, GATHER_B=True, SCALE_B=True, HAS_DB=True)),
    "moe up wgrad (gather x)": ("bf16", "bf16", dict(GATHER_A=True, HAS_DB=True)),
}


def moe_cases():
    off = dict(GATHER_A=False, ACT_A=False, HAS_BIAS=False, SCALE=False, SCATTER=False, DOWN_BACKWARD=False)
    for name, (a_t, o_t, n, k, flags) in MOE_ROWS.items():
        sig = {"a_ptr": f"*{a_t}", "stride_a": "i32", "order_ptr": "*i64", "w_ptr": "*fp32", "s_we": "i32",
               "s_wk": "i32", "s_wn": "i32", "bias_ptr": "*fp32", "s_be": "i32", "scale_ptr": "*fp32",
               "out_ptr": f"*{o_t}", "stride_o": "i32", "offsets_ptr": "*i32", "h_ptr": "*bf16", "stride_h": "i32",
               "gw_ptr": "*fp32", "N": "i32", "M": "i32"}
        for bm, bn, bk, w, st in MF.ROWS_CONFIGS:
            bn = n if flags.get("DOWN_BACKWARD") else min(bn, n)
            consts = dict(off, **flags, K=k, E=256, E_P2=256, TOPK=4, FP32=False, BM=bm, BN=bn, BK=bk)
            yield name, f"{bm}x{bn}x{bk}, {w} warps, {st} stages", MF._rows_kernel, sig, consts, w, st
    off = dict(GATHER_A=False, ACT_A=False, GATHER_B=False, SCALE_B=False, HAS_DB=False)
    for name, (a_t, b_t, flags) in MOE_WGRAD.items():
        sig = {"a_ptr": f"*{a_t}", "stride_a": "i32", "b_ptr": f"*{b_t}", "stride_b": "i32", "order_ptr": "*i64",
               "scale_ptr": "*fp32", "offsets_ptr": "*i32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "sq_ptr": "*fp32",
               "KA": "i32", "NB": "i32", "M": "i32"}
        for bm, bn, bk, w, st in W.WGRAD_CONFIGS:
            consts = dict(off, **flags, TOPK=4, HAS_SQ=True, SQ=W.SQ_TILE, FP32=False, BM=bm, BN=bn, BK=bk)
            yield name, f"{bm}x{bn}x{bk}, {w} warps, {st} stages", W._wgrad_kernel, sig, consts, w, st


def ns_cases():
    """The Gram-side Newton-Schulz segment kernel at vpMoE's 128 x 128 (both segment lengths)."""
    sig = {"r_ptr": "*fp16", "q_ptr": "*fp16", "N": "i32", **{f"s{t}_{a}": "i32" for t in "rq" for a in "bmn"},
           "a": "fp32", "b": "fp32", "c": "fp32"}
    for steps in (2, 3):
        for w in (4, 8, 16):
            yield ("ns gram segment", f"{steps} steps, {w} warps", NG._gram_segment_kernel, sig,
                   dict(STEPS=steps, BN=128, F32_DOT=False), w)


def expert_muon_cases():
    """The experts' streaming Muon kernels at vpMoE's 128-row tiles: the momentum kernel per column
    tile and warps, the update per tiling (and with an fp16 Q, rounded in the kernel), the n x n
    chain with its restart."""
    strides = {f"s{t}_{a}": "i32" for t in "gbur" for a in "bmn"}
    first = {"g_ptr": "*bf16", "buf_ptr": "*fp32", "u_ptr": "*bf16", "r_ptr": "*fp32", "scale_ptr": "*fp32",
             "coef_ptr": "*fp32", "M": "i32", "N": "i32", "mu": "fp32", "eps": "fp32", **strides}
    for bn, w in ((64, 16), (128, 16), (64, 32), (32, 32), (32, 8), (16, 8)):
        yield ("expert momentum gram", f"BN {bn}, {w} warps", EM._momentum_gram_kernel, first,
               dict(NESTEROV=True, BUF_BF16=False, BM=128, BN=bn, F32_DOT=False), w)
    update = {"q_ptr": "*bf16", "q_lo_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*fp32", "low_ptr": "*bf16",
              "decay_ptr": "*fp32", "step_ptr": "*fp32", "M": "i32", "N": "i32",
              **{f"s{name}": "i32" for name in ("q_b", "q_m", "q_k", "x_b", "x_k", "x_n", "w_b", "w_m", "w_n", "l_b",
                                               "l_m", "l_n")}}
    for bn, tiles, w, q16 in ((64, 1, 8, False), (64, 1, 8, True), (64, 1, 16, False), (32, 1, 16, False),
                              (128, 1, 16, False), (64, 4, 8, False)):
        sig = {**update, "q_ptr": "*fp16"} if q16 else update
        yield ("expert update", f"BN {bn} x {tiles} tiles, {w} warps{', fp16 Q' if q16 else ''}",
               ns_update._qx_update_kernel, sig,
               dict(HAS_LOW=True, HAS_LO=True, BM=128, BN=bn, TILES=tiles, F32_DOT=False, Q_FP16=q16), w)
    chain = {"r_ptr": "*fp32", "scale_ptr": "*fp32", "hi_ptr": "*bf16", "lo_ptr": "*bf16", "N": "i32",
             **{f"s{t}_{a}": "i32" for t in "ro" for a in "bmn"}, "a": "fp32", "b": "fp32", "c": "fp32"}
    yield ("expert gram chain", "2 + 3 steps, 8 warps", EM._chain_kernel, chain,
           dict(STEPS1=2, STEPS2=3, BN=128, F32_DOT=False), 8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--only", default="", help="kernels whose name contains this")
    a = ap.parse_args()
    if TF.triton is None:
        sys.exit("bench/kernel_registers.py needs Triton (pip install -e .[test])")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")
    rows = []
    cases = [(*c, 3) for c in [*prologue_cases(), *row_cases(), *ns_cases(), *expert_muon_cases()]] + list(moe_cases())
    for name, config, kernel, sig, consts, warps, stages in cases:
        if a.only not in name:
            continue
        row = {"kernel": name, "config": config, **ptxas_report(kernel, sig, consts, warps, a.arch, stages)}
        print(row, flush=True)
        rows.append(row)
    if a.record:
        import triton
        append_results("kernel_registers", "python bench/kernel_registers.py " + " ".join(sys.argv[1:]), rows,
                       notes=f"ptxas -v for sm_{a.arch}a from the Triton {triton.__version__} wheel; compiled without a GPU")


if __name__ == "__main__":
    main()

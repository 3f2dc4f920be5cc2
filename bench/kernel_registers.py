"""Registers and spills of the project's Triton kernels for sm_90, per autotuning configuration,
compiled on any machine: no GPU needed (the Triton wheel ships ptxas).

    python bench/kernel_registers.py --record            (CPU or GPU machine)

Why: a kernel's registers per thread decide how many warps an SM keeps resident, and so how much
memory latency it hides. The attention prologue's first backward used 191-255 registers in every
configuration (spilling in half of them) and ran at ~15x its memory traffic; this is how that was
found and how its rewrite was checked before any GPU time (docs/performance.md). Kernels are
compiled as a launch would compile them (`specialised`: 16-byte-aligned pointers, and each case's
ints at vpMoE's shapes, 1 a constant and 16-divisible values marked so, as `triton.jit` does);
reports before 2026-12-06 lacked this and overstated registers and spills (the experts' update
180 registers where a launch gets 94, the momentum kernel 296 bytes of spills where it has none;
the fused-MoE GEMMs' ints are still unspecialised). Columns: kernel,
configuration, registers per thread, spill stores/loads (bytes), stack frame (bytes), the
resident warps per SM that the registers allow (65,536 registers per SM, 64 warps at most),
Triton's shared memory, and from the TTGIR the loads pipelined through shared memory, the plain
loads and the layout conversions (`ttgir_counts`).
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
from bench.results import report  # noqa: E402
from vpmoe.kd import row_kernels as RK  # noqa: E402
from vpmoe.model import moe_fused as MF  # noqa: E402
from vpmoe.model import route_fused as RS
from vpmoe.model import router_fused as RF  # noqa: E402
from vpmoe.model import tpa_fused as TF  # noqa: E402
from vpmoe.model import wgrad as W  # noqa: E402
from vpmoe.train import expert_muon as EM  # noqa: E402
from vpmoe.train import ns_gram as NG  # noqa: E402
from vpmoe.train import ns_update  # noqa: E402

DIMS = [8, 2, 128, 4, 2]  # vpMoE's local layers: q heads, kv heads, head_dim, TPA ranks


def specialised(kernel, signature: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """The launch-time specialisation `triton.jit` applies, for an offline compile: pointer arguments
    16-byte aligned (every tensor here starts an allocation), and an int argument given as
    ("i32", value) a constant where the value is 1 and 16-divisible where it is (ints given as a
    bare type stay unknown). Returns (signature, constexprs, attrs) for `ASTSource`."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for name, kind in signature.items():
        kind, value = kind if isinstance(kind, tuple) else (kind, None)
        if value == 1:
            consts[name] = 1
            continue
        sig[name] = kind
        if kind.startswith("*") or (value is not None and value % 16 == 0):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return {**sig, **{k: "constexpr" for k in consts}}, consts, attrs


def ptxas_report(kernel, signature: dict, constexprs: dict, num_warps: int, arch: int = 90, num_stages: int = 3,
                 maxnreg: int = 0) -> dict:
    """Compile `kernel` for sm_<arch> as a launch would (`specialised`; `maxnreg` > 0: that register
    cap) and read ptxas -v: registers, spills, stack, and Triton's shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = specialised(kernel, signature, constexprs)
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       **({"maxnreg": maxnreg} if maxnreg else {})})
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
            "stack_bytes": int(stack.group(1)), "warps_per_sm": warps, "shared_kib": compiled.metadata.shared // 1024,
            **ttgir_counts(compiled.asm["ttgir"])}


def ttgir_counts(ttgir: str) -> dict:
    """What the compiler made of the kernel's data movement, counted in its TTGIR (each op once,
    wherever it sits): `async_copies`, loads the pipeliner streams through shared memory (cp.async);
    `plain_loads`, loads straight to registers; `layout_converts`, tensors moved between register
    layouts (through shared memory or by shuffles: a count, not a cost; a [128, 64] tile from a dot's
    layout to the one a coalesced store wants costs far more than a 64-element sum's; the experts'
    update converted three tiles a column tile until its W load was pipelined too, two since:
    2026-12-06)."""
    ops = re.findall(r"= (?:\"?)([a-z_]+\.[a-z_]+)", ttgir) + re.findall(r"^\s*([a-z_]+\.[a-z_]+) ", ttgir, flags=re.MULTILINE)
    return {"async_copies": ops.count("ttg.async_copy_global_to_local"), "plain_loads": ops.count("tt.load"),
            "layout_converts": ops.count("ttg.convert_layout")}


def prologue_cases():
    starts = TF._column_starts(DIMS)
    H, G, D, Rq, Rkv = DIMS
    common = dict(H=H, G=G, D=D, RQ=Rq, RKV=Rkv, **starts)
    pointers = ["proj_ptr", "qb_ptr", "kb_ptr", "vb_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr"]
    types = ["*bf16"] * 6 + ["*fp32"] * 2
    fwd = dict(zip(pointers + ["q_ptr", "k_ptr", "v_ptr"], types + ["*bf16", "*bf16", "*fp32"]))
    cols = sum(TF.column_layout(*DIMS))  # the projection's row stride (1,064: not 16-divisible)
    fwd.update(N=("i32", 4096), T=("i32", 2048), stride_n=("i32", cols), eps="fp32")  # (a)'s tokens
    for bn, w in TF.FORWARD_CONFIGS:
        yield "tpa prologue forward", f"{bn} tokens, {w} warps", TF._forward_kernel, fwd, dict(common, BN=bn), w
    bwd = dict(zip(pointers + ["gq_ptr", "gk_ptr", "gv_ptr", "gproj_ptr", "gcos_ptr", "gsin_ptr", "part_ptr"],
                   types + ["*bf16", "*bf16", "*fp32", "*bf16", "*fp32", "*fp32", "*fp32"]))
    bwd.update(N=("i32", 4096), T=("i32", 2048), stride_n=("i32", cols), stride_g=("i32", cols), eps="fp32")
    # q, k, v gradients in Flex's [B, heads, T, D] layout: every stride a multiple of D
    bwd.update({f"{g}_s{a}": ("i32", 128 * 2048 if a == "h" else 128 if a == "t" else 128 * 2048 * heads)
                for g, heads in (("gq", H), ("gk", G), ("gv", G)) for a in ("b", "h", "t")})
    part = (H + 2 * G) * D + 2 * D
    for bn, blocks, w in TF.BACKWARD_CONFIGS + TF.SHORT_BACKWARD_CONFIGS:
        yield ("tpa prologue backward", f"{bn} tokens x {blocks} blocks, {w} warps", TF._backward_kernel, bwd,
               dict(common, PART=part, BN=bn, BLOCKS=blocks), w)


def row_cases(vocab: int = 201088):
    block = min(RK.BLOCK, 1 << (vocab - 1).bit_length())
    yield ("loss row logsumexp", f"{block}-column blocks, 8 warps", RK._row_lse_kernel,
           {"z_ptr": "*bf16", "max_ptr": "*fp32", "sum_ptr": "*fp32", "stride": ("i32", vocab)},
           dict(V=vocab, SEGMENT=block * RK.SEGMENT_BLOCKS, BLOCK=block), 8)
    yield ("loss rest gradient", f"{block}-column blocks, 8 warps", RK._rest_grad_kernel,
           {"z_ptr": "*bf16", "lse_ptr": "*fp32", "scale_ptr": "*fp32", "V": ("i32", vocab), "stride": ("i32", vocab)},
           dict(BLOCK=block), 8)


# the fused MoE kernels' four GEMMs per direction at vpMoE's dims (d 1024, width 128, 256 experts, top-4)
MOE_ROWS = {  # name: (A dtype, out dtype, N, K, flags)
    "moe up (gather x)": ("bf16", "bf16", 128, 1024, dict(GATHER_A=True, HAS_BIAS=True)),
    "moe down (act, scale, scatter)": ("bf16", "bf16", 1024, 128, dict(ACT_A=True, HAS_BIAS=True, SCALE=True, SCATTER=True)),
    "moe down backward (gather gy)": ("fp32", "bf16", 128, 1024, dict(GATHER_A=True, DOWN_BACKWARD=True)),
    "moe up dgrad (scatter)": ("bf16", "bf16", 1024, 128, dict(SCATTER=True)),
}
MOE_WGRAD = {  # name: (A dtype, B dtype, A's and B's widths (KA, NB), flags)
    "moe down wgrad (act, gather gy)": ("bf16", "fp32", (128, 1024),
                                        dict(ACT_A=True, GATHER_B=True, SCALE_B=True)),
    # with the bias gradient's row of tiles per expert (`_bias_tile`)
    "moe up wgrad (gather x, bias tiles)": ("bf16", "bf16", (1024, 128), dict(GATHER_A=True, HAS_DB=True)),
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
    for name, (a_t, b_t, (ka, nb), flags) in MOE_WGRAD.items():
        # (a)'s 4,096 tokens x top-4; bf16 dW (`LOW`: graphed.LOW_GRADS, the default at up to 4 micro-batches);
        # the experts busiest first (`BUSIEST`: kernels.WGRAD_BUSIEST_FIRST, the default)
        sig = {"a_ptr": f"*{a_t}", "stride_a": ("i32", ka), "b_ptr": f"*{b_t}", "stride_b": ("i32", nb),
               "order_ptr": "*i64", "scale_ptr": "*fp32", "offsets_ptr": "*i32", "busiest_ptr": "*i32",
               "dw_ptr": "*bf16", "db_ptr": "*fp32",
               "sq_ptr": "*fp32", "KA": ("i32", ka), "NB": ("i32", nb), "M": ("i32", 4 * 4096)}
        for bm, bn, bk, w, st in W.WGRAD_CONFIGS:
            consts = dict(off, **flags, TOPK=4, BUSIEST=True, HAS_SQ=True, SQ=W.SQ_TILE, FP32=False, LOW=True,
                          BM=bm, BN=bn, BK=bk)
            yield name, f"{bm}x{bn}x{bk}, {w} warps, {st} stages", W._wgrad_kernel, sig, consts, w, st


def ns_cases():
    """The Gram-side Newton-Schulz segment kernel at vpMoE's 128 x 128 (both segment lengths)."""
    sig = {"r_ptr": "*fp16", "q_ptr": "*fp16", "N": ("i32", 128), **{f"s{t}_{a}": ("i32", s) for t in "rq"
                                                                   for a, s in zip("bmn", (128 * 128, 128, 1))},
           "a": "fp32", "b": "fp32", "c": "fp32"}
    for steps in (2, 3):
        for w in (4, 8, 16):
            yield ("ns gram segment", f"{steps} steps, {w} warps", NG._gram_segment_kernel, sig,
                   dict(STEPS=steps, BN=128, F32_DOT=False), w)


def expert_muon_cases():
    """The experts' streaming Muon kernels at vpMoE's 128-row tiles: the momentum kernel per column
    tile, warps and pipeline stages (its launches use `expert_muon.CONFIGS`' 3), the update per
    tiling (and with an fp16 Q, rounded in the kernel), the n x n chain with its restart; the last
    two launch at Triton's default 3 stages."""
    # the down projection's orientation: [256, 128, 1024] contiguous, R [256, 128, 128]
    wide, square = (128 * 1024, 1024, 1), (128 * 128, 128, 1)
    strides = {f"s{t}_{a}": ("i32", s) for t in "gbur" for a, s in zip("bmn", square if t == "r" else wide)}
    first = {"g_ptr": "*bf16", "buf_ptr": "*fp32", "u_ptr": "*bf16", "r_ptr": "*fp32", "scale_ptr": "*fp32",
             "coef_ptr": "*fp32", "M": ("i32", 128), "N": ("i32", 1024), "mu": "fp32", "eps": "fp32", **strides}
    for bn, w, st, cap in ((64, 16, 3, 0), (64, 16, 2, 0), (128, 16, 2, 0), (64, 32, 2, 0), (32, 32, 2, 0),
                           (32, 8, 3, 0), (32, 8, 3, 128), (32, 8, 4, 128), (16, 8, 3, 128)):
        yield ("expert momentum gram", f"BN {bn}, {w} warps, {st} stages" + (f", cap {cap}" if cap else ""),
               EM._momentum_gram_kernel, first, dict(NESTEROV=True, BUF_BF16=False, BM=128, BN=bn, F32_DOT=False),
               w, st, cap)
    update = {"q_ptr": "*bf16", "q_lo_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*fp32", "low_ptr": "*bf16",
              "decay_ptr": "*fp32", "step_ptr": "*fp32", "M": ("i32", 128), "N": ("i32", 1024),
              **{f"s{t}_{a}": ("i32", s) for t, axes, dims in (("q", "bmk", square), ("x", "bkn", wide),
                                                               ("w", "bmn", wide), ("l", "bmn", wide))
                 for a, s in zip(axes, dims)}}
    for bn, tiles, w, q16 in ((64, 16, 8, False), (64, 16, 8, True), (64, 1, 8, False), (64, 1, 16, False),
                              (32, 1, 16, False), (128, 1, 16, False), (64, 4, 8, False), (64, 16, 16, False)):
        sig = {**update, "q_ptr": "*fp16"} if q16 else update
        yield ("expert update", f"BN {bn} x {tiles} tiles, {w} warps{', fp16 Q' if q16 else ''}",
               ns_update._qx_update_kernel, sig,
               dict(HAS_LOW=True, HAS_LO=True, BM=128, BN=bn, TILES=tiles, F32_DOT=False, Q_FP16=q16, STAGES=3), w, 3, 0)
    chain = {"r_ptr": "*fp32", "scale_ptr": "*fp32", "hi_ptr": "*bf16", "lo_ptr": "*bf16", "B": "i32", "N": ("i32", 128),
             **{f"s{t}_{a}": ("i32", s) for t in "ro" for a, s in zip("bmn", square)}, "a": "fp32", "b": "fp32",
             "c": "fp32"}
    for shared in (False, True):
        yield ("expert gram chain", "2 + 3 steps, 8 warps" + (", programs shared" if shared else ""),
               EM._chain_kernel, chain, dict(STEPS1=2, STEPS2=3, BN=128, F32_DOT=False, SHARED=shared), 8, 3, 0)


def route_cases():
    """The router's selection kernels (`route_fused`) at vpMoE's routing: (a)'s 2 x 2048 tokens, 256
    experts in 8 groups, top 4 of the 4 best, 16 tokens a program."""
    common = {"T": ("i32", 2048), "J": ("i32", 128), "scale": "fp32"}
    fwd = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "prob_ptr": "*fp32",
           "count_ptr": "*i32", **common}
    bwd = {"logits_ptr": "*fp32", "idx_ptr": "*i64", "gw_ptr": "*fp32", "gprob_ptr": "*fp32", "glogits_ptr": "*fp32",
           **common}
    BN = RS._tokens_per_program(256)
    for w in (4, RS.WARPS):
        yield ("route select", f"{BN} tokens, {w} warps", RS._select_kernel, fwd,
               {"E": 256, "G": 8, "KG": 4, "K": 4, "BN": BN}, w)
        yield ("route select backward", f"{BN} tokens, {w} warps", RS._select_backward_kernel, bwd,
               {"E": 256, "K": 4, "BN": BN}, w)


def router_logits_cases():
    """The router's bf16x3 logits GEMM (`router_fused`) per autotuning configuration, at (a)'s 4,096
    tokens, d = 1024, 256 experts (x and the fp32 weight each split into bf16 pairs in registers)."""
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "N": ("i32", 4096), "D": ("i32", 1024),
           "E": ("i32", 256), "stride_x": ("i32", 1024), "stride_w": ("i32", 1024), "N_BUCKET": ("i32", 4096)}
    for bm, bn, bk, w, st in RF.CONFIGS:
        yield ("router logits", f"{bm} x {bn} x {bk}, {w} warps, {st} stages", RF._logits_kernel, sig,
               dict(BM=bm, BN=bn, BK=bk, F32_DOT=False), w, st, 0)


def all_cases() -> list[tuple]:
    """Every case as (kernel name, configuration label, kernel, signature, constexprs, warps, stages,
    register cap or 0)."""
    return [(*c, 3, 0) for c in [*prologue_cases(), *row_cases(), *ns_cases(), *route_cases()]] + [*expert_muon_cases()] + \
        [(*c, 0) for c in moe_cases()] + [*router_logits_cases()]


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
    for name, config, kernel, sig, consts, warps, stages, cap in all_cases():
        if a.only not in name:
            continue
        row = {"kernel": name, "config": config, **ptxas_report(kernel, sig, consts, warps, a.arch, stages, cap)}
        print(row, flush=True)
        rows.append(row)
    import triton
    report("kernel_registers", rows, a.record,
           notes=f"ptxas -v for sm_{a.arch}a from the Triton {triton.__version__} wheel; compiled without a GPU")


if __name__ == "__main__":
    main()

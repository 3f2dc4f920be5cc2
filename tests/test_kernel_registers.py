"""bench/kernel_registers.py compiles the project's Triton kernels for sm_90 without a GPU (the
Triton wheel's ptxas). These check that it compiles them as a launch would (`specialised`: the
JIT's alignment and unit-stride specialisation, without which the 2026-12 reports overstated
registers and spills) and that every kernel's case still matches its kernel's signature (the
weight-gradient case had fallen behind a new constexpr unnoticed)."""
import pytest

pytest.importorskip("triton")  # a test extra: the CPU-only install has no Triton to compile with
import bench.kernel_registers as KR  # an import failure here is a failure, not a skip


def test_specialised_marks_what_a_launch_would():
    from vpmoe.train import ns_update

    sig = {"q_ptr": "*bf16", "M": ("i32", 128), "N": ("i32", 1000), "sq_k": ("i32", 1), "sx_b": "i32"}
    full, consts, attrs = KR.specialised(ns_update._qx_update_kernel, sig, {"BM": 128})
    names = ns_update._qx_update_kernel.arg_names
    assert consts == {"BM": 128, "sq_k": 1} and full["sq_k"] == "constexpr" and full["BM"] == "constexpr"
    div16 = {names[i] for (i,), a in attrs.items() if a == [["tt.divisibility", 16]]}
    assert div16 == {"q_ptr", "M"}  # 1000 is not 16-divisible; a bare type stays unknown
    assert full["N"] == "i32" and full["sx_b"] == "i32" and "sq_k" not in {names[i] for (i,) in attrs}


def test_every_kernel_case_compiles():
    """The first configuration of each kernel the report lists compiles and reports registers; a
    register cap is kept (the momentum kernel at 8 warps, 32 columns, capped at 128: two programs an
    SM; 130 registers uncapped)."""
    seen, capped = {}, None
    for name, config, kernel, sig, consts, warps, stages, cap in KR.all_cases():
        if name not in seen:
            seen[name] = KR.ptxas_report(kernel, sig, consts, warps, num_stages=stages, maxnreg=cap)
        if cap and capped is None:
            capped = KR.ptxas_report(kernel, sig, consts, warps, num_stages=stages, maxnreg=cap), cap, warps
    report, cap, warps = capped
    assert report["registers"] <= cap and report["spill_stores"] == 0 and report["warps_per_sm"] == 2 * warps, report
    assert sorted(seen) == sorted([
        "tpa prologue forward", "tpa prologue backward", "loss row logsumexp", "loss rest gradient",
        "ns gram segment", "expert momentum gram", "expert update", "expert gram chain", "moe up (gather x)",
        "moe down (act, scale, scatter)", "moe down backward (gather gy)", "moe up dgrad (scatter)",
        "moe down wgrad (act, gather gy)", "moe up wgrad (gather x, bias tiles)", "route select",
        "route select backward", "router logits"])
    for name, report in seen.items():
        assert 16 <= report["registers"] <= 255 and report["warps_per_sm"] >= 4, (name, report)
    # what the TTGIR shows of the data movement: the momentum kernel's g and momentum pipelined through
    # shared memory (two loads, one buffer per stage); the update's x and W both pipelined (W read from
    # shared memory into the products' layout: only the two outputs converted; a hand prefetch of W
    # gave 3 copies and 3 conversions, the layout of x alone)
    assert seen["expert momentum gram"]["async_copies"] >= 2 and seen["expert momentum gram"]["plain_loads"] <= 2
    assert seen["expert update"]["async_copies"] >= 4 and 1 <= seen["expert update"]["layout_converts"] <= 2


def test_ttgir_counts_reads_ops_in_both_forms():
    """Ops with results (`%x = op ...`, generic form `%x = "tt.reduce"(...)`) and without (`tt.store ...`)."""
    text = """
    %a = tt.load %p : !tt.ptr<f32>
    %b = ttg.async_copy_global_to_local %q, %buf : tensor<64x!tt.ptr<i64>> -> <64xi64>
    %c = ttg.convert_layout %a : tensor<128xf32, #blocked> -> tensor<128xf32, #mma>
    %d = ttg.convert_layout %c : tensor<128xf32, #mma> -> tensor<128xf32, #blocked>
    %e = "tt.reduce"(%d) <{axis = 0 : i32}> ({
    tt.store %p, %d : tensor<128x!tt.ptr<f32>>
    %f = tt.load %p : !tt.ptr<f32>
"""
    assert KR.ttgir_counts(text) == {"async_copies": 1, "plain_loads": 2, "layout_converts": 2}

"""Bench helpers that run on any machine: which profiled kernels are dtype casts alone, which
family each kernel falls in, and how the probes' extra trainers are captured and released
(bench/step_probes.py), the KEY=VALUE option sets bench/train_step.py and bench/attention.py take, and
what bench/decode_kernels.py counts as a launch."""
from types import SimpleNamespace

import pytest
import torch

from bench import step_probes
from bench.step_probes import (
    _with_captured_trainers,
    copy_sources,
    is_dtype_cast,
    kernel_sources,
)
from vpmoe.train.profiling import kernel_families, kernel_family, kernel_table


def test_dtype_casts_are_told_from_fused_work():
    assert is_dtype_cast("triton_poi_fused__to_copy_0")
    assert is_dtype_cast("triton_poi_fused__to_copy_clone_12")
    assert is_dtype_cast("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda"
                         "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()"
                         " const::{lambda(float)#1}, at::detail::Array<char*, 2>>(int, ...)")
    # casts fused with math, reductions and GEMMs are other work
    assert not is_dtype_cast("triton_poi_fused__to_copy_add_mul_3")
    assert not is_dtype_cast("triton_red_fused__to_copy_mean_pow_1")
    assert not is_dtype_cast("triton_poi_fused__to_copy_0_extra")
    assert not is_dtype_cast("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64")


def test_kernel_families_from_real_profile_names():
    grouped = ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversal"
               "INS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEE")
    expected = {
        "Memcpy DtoD (Device -> Device)": "copy / memset", "Memset (Device)": "copy / memset",
        "triton_tem_fused__to_copy_flex_attention_backward_mul_sigmoid": "flex attention",
        "triton_poi_fused__to_copy_add_copy__mul_0": "inductor pointwise",
        "triton_red_fused_cat_diagonal_sum_0": "inductor reduction",
        "triton_per_fused_add_mean_pow_3": "inductor reduction",
        "triton_tem_fused_mm_7": "inductor other",
        grouped: "grouped GEMM",
        "nvjet_sm90_hsh_128x128_64x6_1x1_h_bz_NNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "_backward_kernel": "project Triton", "_gram_segment_kernel": "project Triton",
        "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<int>": "sort / scan",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<float>": "aten eager",
        "void at::native::elementwise_kernel<128, 2>": "aten eager",
        "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "gloo:all_to_all": "collective",
        "some_vendor_kernel": "other",
    }
    assert {name: kernel_family(name) for name in expected} == expected
    lines = kernel_families([("triton_poi_fused_a_0", 100, 400.0), ("triton_poi_fused_b_1", 50, 200.0),
                             ("nvjet_sm90_x", 10, 1000.0),
                             ("## Call CompiledFxGraph f5e5sozy7uyoz4hpclsv6vxklvlv34bineb6lf2uyf2yb75djw7w ##", 4, 9220.0)])
    assert [line.split()[:2] for line in lines] == [["inductor", "pointwise"], ["GEMM", "10x"]]
    assert lines[0].split()[2:] == ["150x", "0.60", "ms", "4.0", "us", "each"]
    assert lines[1].split()[2:] == ["1.00", "ms", "100.0", "us", "each"]


def test_kernel_table_lists_every_kernel_by_launches():
    table = kernel_table([("nvjet_sm90_x", 10, 1000.0), ("triton_red_fused_s_2", 300, 900.0),
                          ("## Call CompiledFxGraph abc ##", 4, 9220.0), ("Memset (Device)", 300, 450.0)])
    rows = [line.split("\t") for line in table.splitlines()]
    assert rows[0] == ["family", "launches", "total_us", "us_each", "kernel"]
    assert rows[1:] == [["inductor reduction", "300", "900.0", "3.00", "triton_red_fused_s_2"],
                        ["copy / memset", "300", "450.0", "1.50", "Memset (Device)"],
                        ["GEMM", "10", "1000.0", "100.00", "nvjet_sm90_x"]]


class _FakeTrainer:
    """What `_with_captured_trainers` touches of bench/train_step.py's Trainer: `step`, and its
    graphed step's `warmup` and `release` (after which `graphed` is None, as `release_graphs` sees)."""

    def __init__(self, log, fail_on_step=None):
        self.log, self.fail_on_step, self.steps = log, fail_on_step, []
        self.graphed = SimpleNamespace(warmup=2, release=lambda: log.append(("release", id(self))))

    def step(self, micro):
        if len(self.steps) == self.fail_on_step:
            raise torch.OutOfMemoryError("fake")
        self.steps.append(micro)


def test_probe_trainers_are_stepped_to_capture_then_released():
    log, made = [], []

    def make():
        made.append(_FakeTrainer(log))
        return made[-1]

    row = _with_captured_trainers(make, [["a"], ["b"]], lambda ts: {"steps": [t.steps for t in ts]}, {"oom": 1})
    assert row == {"steps": [[["a"]] * 3, [["b"]] * 3]}  # warm-up (2) + the capture, each on its own micro
    assert log == [("release", id(made[0])), ("release", id(made[1]))]


def test_probe_trainers_out_of_memory_gives_the_row_and_releases_what_was_built():
    log, made = [], []

    def make():
        made.append(_FakeTrainer(log, fail_on_step=1 if made else None))
        return made[-1]

    measured = []
    row = _with_captured_trainers(make, [["a"], ["b"]], measured.append, {"rows_probe": "out of memory"})
    assert row == {"rows_probe": "out of memory"} and measured == []
    assert log == [("release", id(made[0])), ("release", id(made[1]))]  # the half-built second one too


def test_copy_sources_sums_copies_per_launching_op_and_shape():
    def op(name, shapes, kernels, parent=None):
        ks = [SimpleNamespace(name=k, duration=us) for k, us in kernels]
        return SimpleNamespace(name=name, input_shapes=shapes, kernels=ks, cpu_parent=parent)

    step = op("ProfilerStep", [], [])
    fwd = op("CompiledFunction", [], [], step)
    events = [
        op("aten::copy_", [[16384, 1024], [16384, 1024]], [("Memcpy DtoD (Device -> Device)", 18.0)], fwd),
        op("aten::copy_", [[16384, 1024], [16384, 1024]], [("Memcpy DtoD (Device -> Device)", 20.0)], fwd),
        op("aten::cat", [[8, 8]], [("memcpy128", 5.0), ("triton_poi_fused_cat_0", 40.0)], step),
        op("aten::mm", [[8, 8], [8, 8]], [("nvjet_sm90_tst_128x128", 90.0)], fwd),  # no copy: not listed
    ]
    lines = copy_sources(events)
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["0.038", "ms", "2x"] and "aten::copy_ [[16384, 1024], [16384, 1024]]" in lines[0]
    assert lines[0].endswith("CompiledFunction < ProfilerStep")
    assert lines[1].split()[:3] == ["0.005", "ms", "1x"] and "aten::cat" in lines[1]  # the fused kernel not counted


def test_kernel_sources_names_the_ops_behind_torchs_own_kernels():
    def op(name, shapes, kernels, parent=None):
        return SimpleNamespace(name=name, input_shapes=shapes, kernels=[SimpleNamespace(name=k, duration=us)
                                                                        for k, us in kernels], cpu_parent=parent)

    backward = op("_FusedSpanLossBackward", [], [])
    mul = "void at::native::elementwise_kernel<128, 2, MulFunctor<float>>"
    events = [
        op("aten::mul_", [[201088, 1024], []], [(mul, 560.0)], backward),
        op("aten::mul", [[2, 2048, 1024], [1024]], [(mul, 15.0)], backward),
        op("aten::mul", [[2, 2048, 1024], [1024]], [(mul, 16.0)], backward),
        op("aten::mm", [[8, 8], [8, 8]], [("nvjet_sm90_tst_128x128", 90.0)]),  # not torch's elementwise code
    ]
    lines = kernel_sources(events, step_probes._ATEN)
    assert [line.split()[:3] for line in lines] == [["0.560", "ms", "1x"], ["0.031", "ms", "2x"]]
    assert "aten::mul_ [[201088, 1024], []]" in lines[0] and lines[0].endswith("<  _FusedSpanLossBackward")
    assert kernel_sources(events, step_probes._ATEN, rows=1) == lines[:1]


def test_copy_sources_reads_a_real_profile():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.randn(64, 64).t().contiguous()
    assert any(e.name == "aten::clone" for e in prof.events())  # the attributes it reads exist
    assert copy_sources(prof.events()) == []  # no device, no device copies


def test_flex_options_parse_and_fail_on_malformed_items():
    from bench.options import flex_options

    assert flex_options("default") == {}  # torch's own tiles
    assert flex_options("") is None and flex_options(" auto ") is None  # the project's choice per device
    assert flex_options("bwd_BLOCK_M1=64, bwd_num_warps=4,USE_TMA=True,mode=x") == {
        "bwd_BLOCK_M1": 64, "bwd_num_warps": 4, "USE_TMA": True, "mode": "x"}
    with pytest.raises(SystemExit, match="--flex-local: expected KEY=VALUE"):
        flex_options("bwd_BLOCK_M1")


def test_opt_keywords_share_the_parser_and_refuse_the_bench_own_settings():
    from bench.options import parse_opt

    assert parse_opt("ns_pack=4,streams=3,fuse_update=True") == {"ns_pack": 4, "streams": 3, "fuse_update": True}
    with pytest.raises(SystemExit, match="--opt: max_grad_norm is not set here"):
        parse_opt("streams=3,max_grad_norm=1.0")


def test_optim_step_methods_parse_the_gram_kernel_field():
    from bench.optim_step import parse_method

    assert parse_method("gram:256:bfloat16:gram_kernel=1") == ("gram", 256, "bfloat16", {"gram_kernel": True}, "compiled")
    assert parse_method("gram:256:float32:pack=2:gram_kernel=0")[3] == {"ns_pack": 2, "gram_kernel": False}
    assert parse_method("gram:256:float32:stream=1:cols=128")[3] == {"stream_experts": True, "cols": 128}
    assert parse_method("gram:256:float32:mwarps=32:ucols=32:uwarps=16")[3] == {"mwarps": 32, "ucols": 32, "uwarps": 16}
    with pytest.raises(SystemExit, match="bad field 'cols=wide'"):
        parse_method("gram:256:float32:cols=wide")
    with pytest.raises(SystemExit, match="bad field 'gram_kernel=yes'"):
        parse_method("gram:256:float32:gram_kernel=yes")
    assert parse_method("gram:256:float32:order=muon_first:matrices=eager")[3:] == ({"order": "muon_first"}, "eager")
    with pytest.raises(SystemExit, match="bad field 'order=last'"):
        parse_method("gram:256:float32:order=last")


def test_expert_kernel_shapes_set_from_defaults_and_refuse_bad_keys():
    from bench.options import set_expert_kernels
    from vpmoe.train import expert_muon, ns_update

    try:
        set_expert_kernels({"cols": 32, "uwarps": 16, "utiles": 4, "ustages": 4, "cprogs": 32})
        assert expert_muon.CONFIGS["momentum"] == (32, *expert_muon.DEFAULT_CONFIGS["momentum"][1:])
        assert expert_muon.CONFIGS["chain"] == (32,)
        assert ns_update.UPDATE_CONFIG == (ns_update.DEFAULT_UPDATE_CONFIG[0], 4, 16, 4)
        # the others back to the defaults, not to the last call's
        set_expert_kernels({"mwarps": 32, "mstages": 3, "mregs": 128})
        assert expert_muon.CONFIGS["momentum"] == (expert_muon.DEFAULT_CONFIGS["momentum"][0], 32, 3, 128)
        assert ns_update.UPDATE_CONFIG == ns_update.DEFAULT_UPDATE_CONFIG
        assert expert_muon.CONFIGS["chain"] == expert_muon.DEFAULT_CONFIGS["chain"]
        with pytest.raises(SystemExit, match="--expert-kernels: expected"):
            set_expert_kernels({"warps": 8})
        with pytest.raises(SystemExit, match="--expert-kernels: expected"):
            set_expert_kernels({"cols": "wide"})
    finally:
        set_expert_kernels({})
    assert expert_muon.CONFIGS == expert_muon.DEFAULT_CONFIGS and ns_update.UPDATE_CONFIG == ns_update.DEFAULT_UPDATE_CONFIG


def _decode_source_fn(x, w, offs):
    """Known ops for the decode-kernel count: views and a same-dtype `to` launch nothing; a cast, a
    product, a sum and one grouped GEMM (its CPU fallback's inner matmuls not counted) launch."""
    y = x.view(4, 16).t().unsqueeze(0).squeeze(0).to(x.dtype)  # views and a no-op cast: 0
    y = y.to(torch.float64) * 2  # a cast and a product: 2
    z = torch._grouped_mm(x.view(4, 16), w, offs=offs)  # 1, whatever its fallback runs inside
    return y.sum() + z.sum()  # two sums and an add: 3


def test_decode_kernel_count_rules():
    from torch.profiler import ProfilerActivity, profile

    from bench.decode_kernels import count

    x, w = torch.randn(64, dtype=torch.bfloat16), torch.randn(2, 16, 8, dtype=torch.bfloat16)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _decode_source_fn(x, w, offs)
    by_source = count(prof, cuda=False)
    assert by_source == {"(outside vpmoe)": 6}, by_source  # sources: frames under vpmoe/ only


def test_decode_kernel_source_from_parents_else_from_the_recorded_stack():
    """`bench.decode_kernels._source`: the innermost vpmoe/ frame among the op's profiler parents;
    where the tree has none (torch 2.11 on the GPU), the innermost vpmoe/ frame of its own stack."""
    from bench.decode_kernels import _source

    frame = lambda name, parent=None: SimpleNamespace(name=name, cpu_parent=parent)
    tree = frame("aten::mm", frame("vpmoe/model/model.py(205): project_qkv", frame("vpmoe/model/model.py(217): forward")))
    assert _source(SimpleNamespace(cpu_parent=tree.cpu_parent, stack=["/w/vpmoe/x.py(1): other"])) == \
        "model/model.py(205): project_qkv"
    stacked = SimpleNamespace(cpu_parent=frame("aten::linear"), stack=[
        "/t/torch/nn/functional.py(10): linear", "/w/vpmoe/model/model.py(311): mlp", "/w/vpmoe/model/model.py(400): forward"])
    assert _source(stacked) == "model/model.py(311): mlp"
    assert _source(SimpleNamespace(cpu_parent=None, stack=[])) == "(outside vpmoe)"


def test_decode_kernel_source_from_module_ranges():
    """Where neither the tree nor the stack has a vpmoe/ frame (the GPU's torch 2.11), an op is charged
    to the innermost `module_ranges` range around it, layer indices dropped; the hooks go afterwards."""
    from torch.profiler import ProfilerActivity, profile

    from bench.decode_kernels import _source, count, module_ranges

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act = torch.nn.Linear(8, 4), torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.up(x)) * 2  # addmm in "up", relu in "act", the product in the block

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block(), Block()])
    x = torch.randn(3, 8)
    # no Python frames recorded, as on the GPU (a second with_stack profile in one process also read
    # a garbage event name in torch 2.13's parser: a UnicodeDecodeError, not this code's)
    with profile(activities=[ProfilerActivity.CPU]) as prof, module_ranges(model):
        for block in model.layers:
            x = torch.cat([block(x), block(x)], -1)  # the cat outside every module
    assert count(prof, cuda=False) == {"module layers.*.up": 4, "module layers.*.act": 4, "module layers.*": 4,
                                       "(outside vpmoe)": 2}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    frame = lambda name, parent=None: SimpleNamespace(name=name, cpu_parent=parent)
    ranged = frame("aten::mm", frame("module layers.*.ffn", frame("module layers.*")))
    assert _source(SimpleNamespace(cpu_parent=ranged.cpu_parent, stack=[])) == "module layers.*.ffn"
    framed = frame("module layers.*.ffn", frame("vpmoe/model/model.py(311): mlp"))
    assert _source(SimpleNamespace(cpu_parent=framed, stack=[])) == "model/model.py(311): mlp"  # frames first

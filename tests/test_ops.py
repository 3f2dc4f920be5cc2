"""vpmoe/ops.py: the project's custom ops as one set, and Inductor's compile cache keyed on them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_op_modules_are_every_module_that_defines_an_op():
    """OP_MODULES names exactly the modules whose source registers a `vpmoe::` op, and importing
    them registers every op those sources define."""
    from vpmoe import ops

    defined = {}
    for path in (ROOT / "vpmoe").rglob("*.py"):
        names = re.findall(r'custom_op\(\s*"vpmoe::(\w+)"', path.read_text())
        if names:
            defined[".".join(path.relative_to(ROOT).with_suffix("").parts)] = names
    assert set(ops.OP_MODULES) == set(defined)
    registered = {op.name().split("::")[1] for op in ops.registered_ops()}
    assert registered >= {n for names in defined.values() for n in names}


def test_salt_keeps_a_users_tag_and_replaces_an_old_digest(monkeypatch):
    from vpmoe import ops

    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine|vpmoe-ops:0123456789abcdef")
    ours = "vpmoe-ops:" + ops.ops_digest()
    assert ops.salt_compile_cache() == f"mine|{ours}"
    assert ops.salt_compile_cache() == f"mine|{ours}"  # idempotent
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "")
    assert ops.salt_compile_cache() == ours


# one process of the end-to-end test below: a `vpmoe::` op tagged from VPMOE_PROBE_TAG consumes a
# GEMM output that Inductor pads (1064 columns at a 1088 stride, its padding switched on as on a
# GPU; the output is saved for backward, as tpa_prologue's is); prints whether the forward passed
# the op the GEMM's own buffer ("direct") or a dense copy ("copied")
PROBE = r'''
import os, re, torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code
from vpmoe import ops
tag = getattr(torch.Tag, os.environ["VPMOE_PROBE_TAG"])

@torch.library.custom_op("vpmoe::cache_probe", mutates_args=(), tags=(tag,))
def cache_probe(x: torch.Tensor) -> torch.Tensor:
    return x.sum(1)

@cache_probe.register_fake
def _(x):
    return x.new_empty(x.shape[0])

def setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # saved, as tpa_prologue saves its input: a graph output, so padded

def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g[:, None] * x.sign()

cache_probe.register_autograd(backward, setup_context=setup)

# the product's way to compile (salted), or torch's alone
compile_fn = ops.salted_compile if os.environ["VPMOE_PROBE_SALT"] == "1" else torch.compile
inductor_config.disable_padding_cpu = False
x, w = torch.randn(32, 64, requires_grad=True), torch.randn(1064, 64)
out, (code,) = run_and_get_code(compile_fn(lambda x, w: cache_probe(x @ w.t())), x, w)
torch.testing.assert_close(out, (x @ w.t()).sum(1))
gemm = re.search(r"extern_kernels\.mm\(.*out=(buf\d+)\)", code).group(1)
print("direct" if f"torch.ops.vpmoe.cache_probe.default({gemm})" in code else "copied")
'''


def _probe(tag: str, salt: bool, cache_dir: Path) -> str:
    env = {**os.environ, "VPMOE_PROBE_TAG": tag, "VPMOE_PROBE_SALT": str(int(salt)),
           "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


def test_a_changed_op_tag_is_not_served_a_stale_graph(tmp_path):
    """Two processes sharing one Inductor cache compile the same graph around a `vpmoe::` op whose
    layout tag differs between them (exact strides, then the traced order). With the salt, the
    second gets a graph for its own tag (the padded GEMM output passed as it is) instead of the
    first's (a dense copy first), which Inductor's FX graph cache alone returned (2026-12-08)."""
    cache = tmp_path / "inductor"
    assert _probe("needs_exact_strides", True, cache) == "copied"
    assert _probe("needs_fixed_stride_order", True, cache) == "direct"

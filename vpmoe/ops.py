"""The project's torch custom ops (`vpmoe::*`) as one set, and Inductor's compile cache keyed on them.

Why: Inductor's FX graph cache keys a compiled graph on its code, inputs, configuration and torch's
version, but not on the layout tags of the custom ops it calls. Found on 2026-12-08: with the cache
on, `tpa_prologue`'s graph came back as compiled before its `needs_fixed_stride_order` tag (with the
copy the tag removes); with `TORCHINDUCTOR_FX_GRAPH_CACHE=0` the new graph. A stale graph keeps the
layout handling its op had when it was compiled, so after a tag change it could hand a kernel
strides the kernel no longer expects. `salt_compile_cache()` adds a digest of every vpmoe op's
schema and tags to `torch.compiler.config.cache_key_tag` (part of that key), so graphs compiled
against other op definitions are not reused. The places that compile graphs which may hold these ops
do it through `salted_compile` (FastBody's blocks, FastMuonAdamW's compiled pieces, the fused loss;
not flex.py's compiled `flex_attention`, which holds none); salting again is cheap. Schemas and tags only: an op's Python or Triton code is read at run time (and
Triton keys its own cache on the kernel's source), and a changed fake (output strides) fails loudly
at `assert_size_stride`, so neither needs a new key; keying on source would recompile every graph
after any edit of those modules.
"""
from __future__ import annotations

import hashlib
import importlib

import torch

# every module that registers a `vpmoe::` op (tests/test_ops.py checks the list against the sources)
OP_MODULES = (
    "vpmoe.model.grouped", "vpmoe.model.moe_fused", "vpmoe.model.route_fused", "vpmoe.model.router_fused",
    "vpmoe.model.tpa_fused", "vpmoe.model.wgrad", "vpmoe.train.expert_muon", "vpmoe.train.ns_gram",
    "vpmoe.train.ns_update",
)
_TAG_PREFIX = "vpmoe-ops:"


def registered_ops() -> list[torch._ops.OpOverload]:
    """Every overload in the `vpmoe` namespace, after importing every module that defines one."""
    for name in OP_MODULES:
        importlib.import_module(name)
    ops = []
    for name in sorted(dir(torch.ops.vpmoe)):
        packet = getattr(torch.ops.vpmoe, name)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            ops += [getattr(packet, overload) for overload in sorted(packet.overloads())]
    return ops


def ops_digest() -> str:
    """A digest of the ops' schemas and tags (16 hex digits)."""
    lines = [f"{op._schema} {sorted(str(t) for t in op.tags)}" for op in registered_ops()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def salt_compile_cache() -> str:
    """Put `vpmoe-ops:<digest>` into `torch.compiler.config.cache_key_tag` (a user's own tag stays;
    an earlier vpmoe digest is replaced) and return the tag ("" on a torch without that setting)."""
    if not hasattr(torch.compiler.config, "cache_key_tag"):  # an older torch: no tag to salt
        return ""
    ours = _TAG_PREFIX + ops_digest()
    parts = [p for p in torch.compiler.config.cache_key_tag.split("|") if p and not p.startswith(_TAG_PREFIX)]
    torch.compiler.config.cache_key_tag = "|".join(parts + [ours])
    return torch.compiler.config.cache_key_tag


def salted_compile(fn, **kwargs):
    """`torch.compile(fn, **kwargs)` after `salt_compile_cache()`: how the project compiles graphs
    that may hold its ops, so their cached forms are keyed on the ops as they are now."""
    salt_compile_cache()
    return torch.compile(fn, **kwargs)

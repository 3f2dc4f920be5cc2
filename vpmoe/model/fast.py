"""The train step's forward, fused: same parameters and function as `VpMoE.forward`, restructured.

`FastBody(model)(tokens, doc_ids) -> (hidden [B, T, d] bf16, aux_loss, expert_load)` reads the
model's own parameters (nothing is copied, state dicts and optimizers are untouched) and computes
what `model(tokens, doc_ids=doc_ids, return_hidden=True)` computes under bf16 autocast; the head
and loss run after it (`vpmoe.kd.fused.fused_span_loss`). tests/test_kernels.py (CPU, fp32) and
tests/gpu/ (bf16) check it against the reference.

Design choices:
- One function per block kind (dense / local MoE / global MoE) taking the block's parameters as a
  dict, compiled once per kind with `torch.compile(fullgraph=True)` (it falls back to graph breaks,
  then eager, with a warning, if that fails) and reused by every layer of the kind: compile
  time does not grow with depth. No graph breaks: block masks, positions and the ALiBi slopes are
  made outside and passed in.
- Compute: GEMMs in bf16 with fp32 accumulation; norms, TPA products, rotary, softmax gates,
  routing, biases and activations in fp32, fused by Inductor around the GEMMs; the residual
  stream stays fp32 like the reference's under autocast.
  The dense linears are `dense_linear`'s: their weight gradients come out of their GEMM in fp32
  (no bf16 rounding of dW, no widening casts), and their weights are cast to bf16 once per
  forward for every block by one multi-tensor copy (`DenseCopies`) instead of ~7 tiny casts a block.
- Attention projections are one GEMM per layer: local layers concatenate the six TPA factor
  matrices (1064 output columns), global layers wq/wk/wv. On CUDA the local layers' TPA
  contraction, bias, QK-norm and GRAPE rotation are one Triton kernel each way
  (`tpa_fused.local_qkv`, `fused_prologue`); elsewhere (and on global layers) they are pointwise
  work for Inductor to fuse around the GEMMs.
- Attention: FlexAttention with the sink folded in through the LSE (`flex.flex_with_sinks`);
  the CPU path (tests) uses the reference attention.
- MoE: the router (`route_fused.route_with_stats`: the reference's math, fp32 logits, sigmoid, bias,
  group-limited top-k, the aux loss and the load counts; on CUDA one Triton kernel each way after
  the logits GEMM, elsewhere `kernels.select_experts`' fusable rounds of max for Inductor), then
  `kernels.routed_experts` (device-side sort, grouped GEMMs, gathers only, nothing [N*k, d] kept), or with
  `fused_moe=True` `moe_fused.routed_experts` (Triton grouped GEMMs that gather the token rows,
  scale and scatter the outputs themselves, keeping only the [N*k, 128] expert activations for
  backward; not yet faster in the whole step, docs/performance.md). The
  shared expert is two dense GEMMs on the same normed input, in the block's compiled graph (one
  stream). Split off as a compiled piece on a side stream beside the routed path, the (a) step read
  62.01 against 61.70 ms and its graphed step left the eager one's updates (H100, 2026-12-05), so
  it is not overlapped (docs/performance.md, "What helped").
- Activation checkpointing (`checkpoint=True`, `train.activation_checkpointing`): each block's
  compiled call is wrapped in non-reentrant `torch.utils.checkpoint`, so a block keeps only its
  inputs (the fp32 residual stream, the first layer's values) and recomputes the rest in
  backward. This is what lets the 80-layer model's activations fit next to its optimizer state
  on an 80 GB GPU; it costs one more forward per block. `checkpoint=N` covers the first N blocks
  only: on a bigger GPU the rest keep their activations and skip the recompute. Recomputation is
  deterministic (stable sort, no dropout), so recomputed routing equals the first pass's.
- `lean_saves=True` (`train.lean_saves`): the blocks that keep their activations compile with the
  partitioner allowed to recompute cheap pointwise results in backward instead of keeping them
  (`LEAN_SAVES`, below): ~30% less kept per block for some recompute in every backward.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from vpmoe import ops
from vpmoe.config import checkpointed_blocks
from vpmoe.model import dense_linear as DL
from vpmoe.model import flex as FX
from vpmoe.model import kernels as K
from vpmoe.model import model as M
from vpmoe.model import moe_fused as MF
from vpmoe.model import route_fused as RS
from vpmoe.model import tpa_fused as TF
from vpmoe.model import wgrad as W


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_acc(x))
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)


def tpa(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., h, R], b [..., R, D] -> [..., h, D] = mean_r a[h, r] * b[r, :], written as R
    multiply-adds: pure pointwise work for Inductor (a product summed over the rank axis became
    reduction kernels; this form measured 4% faster for a whole local attention sub-block)."""
    out = a[..., 0:1] * b[..., 0, :].unsqueeze(-2)
    for r in range(1, a.shape[-1]):
        out = out + a[..., r:r + 1] * b[..., r, :].unsqueeze(-2)
    return out / a.shape[-1]


def make_block_fn(cfg, layer: int, dt: torch.dtype, flex: bool, bf16x3: bool = False, fused_prologue: bool = False,
                  fused_moe: bool = False):
    """The whole block as a function of (params dict, x, positions, doc, v_first, mask, slopes) ->
    (x, the values [B, G, T, D] on the first layer (later layers' v_first) else None, aux, load).
    `fused_prologue`: local layers' TPA + bias + QK-norm + rotation by `tpa_fused.local_qkv`;
    `fused_moe`: the routed experts by `moe_fused.routed_experts` (else `kernels.routed_experts`)."""
    H, G, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    Rq, Rkv, eps = cfg.tpa_q_rank, cfg.tpa_kv_rank, cfg.norm_eps
    is_global, is_moe, first = cfg.is_global(layer), cfg.is_moe(layer), layer == 0
    window = None if is_global else cfg.window
    routed_experts = MF.routed_experts if fused_moe else K.routed_experts
    groups = DL.dense_groups(cfg, layer)  # the block's dense linears: their weight and bias parts

    def dense(p, x, name):
        return DL.group_linear(p, x, name, groups[name], dt)

    dims = [H, G, D, Rq, Rkv]

    def project(p, h, pos):
        """q [B, H, T, D], k [B, G, T, D] normed (and rotated on local layers); v [B, G, T, D].
        Local layers: one GEMM for the six TPA factors, then the Triton prologue (`fused_prologue`)
        or the same math in torch for Inductor."""
        B, T, _ = h.shape
        acc = _acc(h)
        if is_global:
            q, k, v = dense(p, h, "attn.qkv").to(acc).split([H * D, G * D, G * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        else:
            proj = dense(p, h, "attn.tpa")
            freq = torch.exp(p["attn.log_freq"].to(acc) / cfg.grape_log_scale)
            angles = pos.to(acc)[:, :, None] * freq  # [B, T, D/2]
            cos, sin = angles.cos(), angles.sin()
            if fused_prologue:
                return TF.local_qkv(proj.view(B * T, -1), p["attn.q_bias"], p["attn.k_bias"], p["attn.v_bias"],
                                    p["attn.q_norm.weight"], p["attn.k_norm.weight"], cos.view(B * T, -1),
                                    sin.view(B * T, -1), T, eps, dims)
            aq, bq, ak, bk, av, bv = proj.to(acc).split(TF.column_layout(*dims), dim=-1)
            q = tpa(aq.view(B, T, H, Rq), bq.view(B, T, Rq, D)) + p["attn.q_bias"].view(H, D)
            k = tpa(ak.view(B, T, G, Rkv), bk.view(B, T, Rkv, D)) + p["attn.k_bias"].view(G, D)
            v = tpa(av.view(B, T, G, Rkv), bv.view(B, T, Rkv, D)) + p["attn.v_bias"].view(G, D)
        q = rms(q, p["attn.q_norm.weight"], eps).transpose(1, 2)  # [B, H, T, D]
        k = rms(k, p["attn.k_norm.weight"], eps).transpose(1, 2)
        if not is_global:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D/2]: every head
            q, k = M.rotate(q, cos, sin), M.rotate(k, cos, sin)
        return q, k, v.transpose(1, 2)

    def attention(p, h, pos, doc, v_first, mask, slopes):
        B, T, _ = h.shape
        q, k, v = project(p, h, pos)
        v_raw = v
        if not first:
            lam = p["attn.value_mix"].to(v.dtype)
            v = lam * v + (1 - lam) * v_first
        if flex:
            out = FX.flex_with_sinks(q.to(dt), k.to(dt), v.to(dt), p["attn.sinks"], mask, slopes)
        else:
            out = M.attention_reference(q, k, v, p["attn.sinks"], pos, pos, doc, doc, window, slopes)
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return dense(p, out, "attn.wo").to(_acc(h)), v_raw

    def ffn(p, prefix, h):
        up = dense(p, h, f"{prefix}up").to(_acc(h))
        return dense(p, M.squared_relu(up), f"{prefix}down").to(_acc(h))

    def block(p, x, pos, doc, v_first, mask, slopes):
        B, T, _ = x.shape
        a, v_raw = attention(p, rms(x, p["attn_norm.weight"], eps), pos, doc, v_first, mask, slopes)
        # only the first layer's values are used again (v_first): an output nobody reads would still
        # get a zero-filled gradient in the compiled backward (and a re-strided copy on global layers)
        v_raw = v_raw if first else None
        x = x + a
        h = rms(x, p["ffn_norm.weight"], eps)
        if not is_moe:
            return x + ffn(p, "ffn.", h), v_raw, None, None
        flat = h.view(B * T, d)
        idx, weight, aux, load = RS.route_with_stats(flat, p["ffn.router.weight"], p["ffn.expert_bias"], cfg, B, bf16x3,
                                                     p.get("low.ffn.router.weight"))
        w_args = (p["ffn.w_up"], p["ffn.b_up"], p["ffn.w_down"], p["ffn.b_down"])
        if any(f"{kind}.w_up" in p for kind in ("sq_probe", "low", "grad_to")):  # FastBody's grad_sq,
            routed = K.routed_experts(flat.to(dt), idx, weight, *w_args,  # use_weight_copies, use_low_grads
                                      probes=(p.get("sq_probe.w_up"), p.get("sq_probe.w_down")),
                                      low=(p.get("low.w_up"), p.get("low.w_down")),
                                      grad_to=(p.get("grad_to.w_up"), p.get("grad_to.w_down")))
        else:
            routed = routed_experts(flat.to(dt), idx, weight, *w_args)
        f = ffn(p, "ffn.shared.", flat) + routed.to(flat.dtype)
        return x + f.view(B, T, d), v_raw, aux, load

    block.attention, block.ffn = attention, ffn  # pieces, for bench/train_step.py's breakdown
    return block


def _final_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return rms(x, weight, eps).to(dtype)


def _embed(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    x = F.embedding(tokens, weight)
    return x if x.dtype == torch.float64 else x.float()


def _sorted_with_firsts(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token ids sorted, the sort's order, and which sorted entries are a value's first
    (static shapes, no `unique`: capturable, no host sync)."""
    ids, order = tokens.reshape(-1).sort()
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids, order, first


def embedding_grad_sq(grad: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Squares of the embedding gradient grad [V, d] summed per distinct row of `tokens`, each row
    once ([n] fp32, zeros at repeats): their sum is ||grad||^2 when every other row is zero, as after
    one backward of a lookup of `tokens`. It reads those rows (16 MiB at 4,096 tokens) instead of the
    whole [V, d] table (~0.8 GB fp32 at V = 201,088). Static shapes (sort, not unique): capturable."""
    ids, _, first = _sorted_with_firsts(tokens)
    return grad.index_select(0, ids).float().square().sum(1) * first


def embedding_rows(tokens: torch.Tensor, grad_out: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding's gradient after one backward, as (rowmap [V] int64, rows [n, d] fp32) from the
    lookup's tokens [..] and the gradient of its output [.., d]: row v of the [V, d] gradient is
    rows[rowmap[v]] where rowmap[v] >= 0 and zero elsewhere. Each distinct token gets one row (its
    positions' gradients summed, `index_add_` in position order, as the dense lookup backward
    sums them); rows past the distinct count stay zero, so ||rows||^2 is the gradient's squared
    norm. 16 MiB at 4,096 tokens instead of a [V, d] fp32 table (~0.8 GB at V = 201,088) written
    whole and read whole by AdamW (FastMuonAdamW.step(row_grads=...)). Static shapes (sort and
    cumulative sum, not unique): capturable, no host sync."""
    ids = tokens.reshape(-1)
    g = grad_out.reshape(ids.numel(), -1)
    _, order, first = _sorted_with_firsts(ids)
    slot = torch.empty_like(ids).scatter_(0, order, first.long().cumsum(0) - 1)  # each position's row
    rows = torch.zeros(g.shape, dtype=torch.float32, device=g.device).index_add_(0, slot, g.float())
    rowmap = torch.full((vocab,), -1, dtype=torch.long, device=ids.device).scatter_(0, ids, slot)
    return rowmap, rows


# Saved-for-backward policy of the compiled blocks. By default AOTAutograd's partitioner will not
# recompute, in backward, a pointwise result that the backward materialises anyway (an activation
# feeding a weight-gradient GEMM), so a block kept both a GEMM's output and its activated copy
# (e.g. the shared expert's up output and squared ReLU, 1 KiB per token each). Lifting that ban lets
# it keep the one and recompute the cheap other inside the backward's fused kernels. Measured (H200,
# 80 layers, 2 x 65k tokens, 50 blocks checkpointed): a local MoE block keeps 28.9 -> 19.8 KiB per
# token, the step's peak 132.1 -> 110.2 GiB, the step 2,500 -> 2,590 ms with every block lean
# (~0.56 ms per block and micro-batch, derived). Opt-in (`train.lean_saves`) until its memory has
# been spent on fewer checkpointed blocks and timed (estimated ~-4% at 80 layers; not measured). A
# checkpointed block keeps only its input, lean or not, so it compiles with the default (no extra
# recompute): blocks get a compiled function per (kind, lean).
LEAN_SAVES = {"ban_recompute_materialized_backward": False}


def _partitioner_options(lean: bool) -> dict:
    if not lean:
        return {}
    known = getattr(torch._functorch.config, "_config", {})  # a torch without the option keeps its default
    return {k: v for k, v in LEAN_SAVES.items() if k in known}


def _backend_with(backend, partitioner: dict):
    """`backend` compiling under the partitioner options. Its own callable, not the options patched
    around the call: every block kind's function shares one code object, so Dynamo would serve a
    lean block the graph a checkpointed block of the same kind compiled first (found in review: the
    option then did nothing); a cached graph is reused only for the backend that compiled it."""
    if not partitioner:
        return backend

    def compile_fn(gm, example_inputs):
        with torch._functorch.config.patch(**partitioner):
            return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    return compile_fn


class _CompileLadder:
    """torch.compile(fullgraph) -> torch.compile (graph breaks allowed) -> eager, on first failure.
    `partitioner`: torch._functorch.config options in force while the compiled rungs compile."""

    def __init__(self, fn, enabled: bool, backend="inductor", partitioner: dict | None = None):
        self.fn = fn
        self.partitioner = partitioner or {}
        backend = _backend_with(backend, self.partitioner)
        self.rungs = ([("fullgraph", ops.salted_compile(fn, dynamic=False, fullgraph=True, backend=backend)),
                       ("graph-breaks", ops.salted_compile(fn, dynamic=False, backend=backend))]
                      if enabled else []) + [("eager", fn)]
        self.failures: list[str] = []

    @property
    def mode(self) -> str:
        return self.rungs[0][0]

    def __call__(self, *args):
        while True:
            try:
                return self.rungs[0][1](*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001
                if len(self.rungs) == 1:
                    raise
                self.failures.append(f"{self.rungs[0][0]}: {e!r:.400}")
                warnings.warn(f"vpmoe.model.fast: {self.rungs[0][0]} failed ({e!r:.400}); trying {self.rungs[1][0]}")
                self.rungs.pop(0)


class FastBody:
    """Embedding + blocks + final norm of a VpMoE, on the fused path (see the module docstring)."""

    def __init__(self, model: M.VpMoE, compile: bool | None = None, dtype: torch.dtype | None = None,
                 static_masks: bool = False, checkpoint: bool | int = False, compile_backend: str = "inductor",
                 fused_prologue: bool | None = None, fused_moe: bool = False, lean_saves: bool = False):
        self.model, self.cfg = model, model.cfg
        self.checkpoint = checkpointed_blocks(checkpoint, model.cfg.n_layers)  # the first blocks
        p0 = model.embed.weight
        self.flex = p0.is_cuda
        self.dtype = dtype or (torch.bfloat16 if p0.is_cuda else p0.dtype)
        use_compile = p0.is_cuda if compile is None else compile
        if use_compile:  # one code object serves every block kind and shape: room for all of them
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.static_masks = static_masks
        self._masks: dict = {}
        self.slopes = M.alibi_slopes(self.cfg.n_heads).to(p0.device)
        # the router's logits at near-fp32 on tensor cores, its gradients at bf16 like every other
        # gradient's GEMMs: in a bf16 body only (an fp32 body keeps the reference's fp32 GEMMs)
        self.bf16x3 = self.dtype == torch.bfloat16 and K.bf16x3_available(p0.device)
        c = self.cfg
        dims = [c.n_heads, c.n_kv_heads, c.head_dim, c.tpa_q_rank, c.tpa_kv_rank]
        # the Triton prologue wherever it runs (CUDA with Triton); None = that default
        self.fused_prologue = ((self.flex and TF.available(p0.device) and TF.supported(dims))
                               if fused_prologue is None else fused_prologue)
        # the Triton routed experts (moe_fused) only when asked: faster for one MoE layer alone and
        # 1 GiB less activation memory per layer at 64k tokens, but the whole 80-layer step measured
        # 3,102 vs 2,790 ms with the grouped-GEMM path (docs/performance.md)
        self.fused_moe = bool(fused_moe) and MF.available(p0.device) and MF.supported(c.d_model, c.expert_ffn)
        self.fns, self.kind_of = {}, []
        for i in range(self.cfg.n_layers):
            # (global, moe, first, lean): a checkpointed block keeps only its input, lean or not
            kind = (self.cfg.is_global(i), self.cfg.is_moe(i), i == 0, lean_saves and i >= self.checkpoint)
            if kind not in self.fns:
                self.fns[kind] = _CompileLadder(make_block_fn(self.cfg, i, self.dtype, self.flex, self.bf16x3,
                                                              self.fused_prologue, self.fused_moe),
                                                use_compile, compile_backend, _partitioner_options(kind[3]))
            self.kind_of.append(kind)
        self.params = [self._block_params(b) for b in model.layers]
        # the dense weights in the GEMM dtype, cast once per forward for every block (DL.DenseCopies)
        self.dense_copies = (DL.DenseCopies(self.cfg, self.params, self.dtype, router=self.bf16x3)
                             if DL.wants_copies(self.dtype, p0.dtype) else None)
        # grad_sq (set by a caller that steps after one backward, e.g. GraphedTrainStep with one
        # micro-batch): each MoE block of a forward with grad gets fresh probes (`kernels.sq_probe`),
        # whose gradients carry the expert weight gradients' squares, and the forward's tokens are
        # kept for the embedding's (`known_grad_sq`)
        self.grad_sq = False
        self.sq_probes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sq_tokens: torch.Tensor | None = None
        # embed_rows (set by a caller that steps after one backward, e.g. GraphedTrainStep with one
        # micro-batch): the lookup reads the weight detached and its output is a leaf, whose
        # gradient becomes the embedding's gradient as rows (`embedding_row_grads`): no [V, d] one
        self.embed_rows = False
        self.embed_out: torch.Tensor | None = None
        self.embed_tokens: torch.Tensor | None = None
        # use_weight_copies: {layer: {name: [master, copy in the GEMM dtype, master's version at the copy]}}
        self.copies: dict[int, dict[str, list]] = {}
        self.head_copy: list | None = None  # the output head's, the same [master, copy, version]
        self.holders: dict[int, dict[str, tuple]] = {}  # use_low_grads: {layer: {name: (master, holder)}}
        # compiled, the lookup's backward is an atomic scatter-add kernel: no host sync, so the
        # backward can be captured in a CUDA graph (the eager CUDA embedding backward may sync)
        self.embed = _CompileLadder(_embed, use_compile, compile_backend)
        # the final norm compiled too: eagerly it is ~5 kernels forward and ~10 backward
        self.final_norm = _CompileLadder(_final_norm, use_compile, compile_backend)

    @staticmethod
    def _block_params(block) -> dict:
        p = dict(block.named_parameters())
        if isinstance(block.ffn, M.MoE):
            p["ffn.expert_bias"] = block.ffn.expert_bias
        return p

    def known_grad_sq(self) -> dict[int, torch.Tensor]:
        """{id(weight): partial sums of its gradient's squares} for the expert weights whose gradient
        the last forward's backward wrote through the Triton kernel (`grad_sq`), and for the
        embedding (its rows of the forward's tokens, `embedding_grad_sq`): valid for the optimizer's
        clipping norm only while that backward is the only one since the gradients were cleared (one
        micro-batch), as FastMuonAdamW.step(known_sq=...) assumes."""
        known = {id(w): probe.grad for w, probe in self.sq_probes if probe.grad is not None}
        embed = self.model.embed.weight
        # its rows outside the tokens are 0 (not so for a head sharing its weight: then it is read)
        if self.sq_tokens is not None and embed.grad is not None and embed is not self.model.lm_head.weight:
            known[id(embed)] = embedding_grad_sq(embed.grad, self.sq_tokens)
        return known

    def embedding_row_grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{id(embedding weight): (rowmap, rows)} (`embedding_rows`) from the last forward's lookup
        when `embed_rows` was on and its backward ran ({} otherwise): the embedding's whole gradient
        while that backward is the only one since the step began (one micro-batch), for
        `FastMuonAdamW.step(row_grads=...)`; the weight's own `.grad` stays None."""
        if self.embed_out is None or self.embed_out.grad is None:
            return {}
        weight = self.model.embed.weight
        return {id(weight): embedding_rows(self.embed_tokens, self.embed_out.grad, weight.shape[0])}

    def use_weight_copies(self, on: bool = True) -> dict[int, torch.Tensor]:
        """Keep the expert weights of the blocks that keep their activations (not checkpointed) in
        the GEMM dtype, instead of casting the fp32 masters in every forward (a checkpointed block
        keeps casting: its cast is transient). The copies are memory of their own (+2.15 GiB at
        the (a) bench's 20 layers, for -2.0% step time; graphed.WEIGHT_COPIES): the compiled blocks
        evidently recompute the cast in backward rather than keep it. The output head's weight
        too (`head_low()`, for the loss's `head_low`): the loss casts it whole in each forward,
        a transient as large as the copy at the step's peak. The same bits as the cast:
        whoever updates a master must write its copy (FastMuonAdamW.weight_copies, the returned
        {id(master): copy}) and then `mark_copies_current()`; a master changed any other way (its
        version counter moved) is cast again before the next forward or captured replay
        (`refresh_stale_copies`). Only for bf16 bodies (the experts' on the grouped path); else
        nothing is kept."""
        self.copies, self.head_copy = {}, None
        if on and self.dtype == torch.bfloat16:
            head = self.model.lm_head.weight
            self.head_copy = [head, torch.empty_like(head, dtype=self.dtype), -1]
            for i in range(len(self.model.layers)):
                if self.kind_of[i][1] and i >= self.checkpoint and not self.fused_moe:
                    masters = {w: self.params[i][f"ffn.{w}"] for w in ("w_up", "w_down")}
                    self.copies[i] = {w: [m, torch.empty_like(m, dtype=self.dtype), -1] for w, m in masters.items()}
        self.refresh_stale_copies()
        return {id(master): low for master, low, _ in self._copy_entries()}

    def use_low_grads(self, on: bool = True) -> int:
        """The expert weights' gradients in bf16 (graphed.LOW_GRADS): every MoE block's two expert
        weights get a `wgrad.grad_holder` (2 bytes of memory each) that takes its gradient, and the
        masters get none: the weight-gradient kernel writes half the bytes (it rounds its fp32
        sums once), the grouped-GEMM path skips its widening cast, later micro-batches add into
        the bf16 gradient in place, and the optimizer reads half (`low_grads`, for
        `FastMuonAdamW.step(grads=...)`). Only for bf16 bodies on the grouped path; returns how many
        weights have a holder."""
        self.holders = {}
        if on and self.dtype == torch.bfloat16 and not self.fused_moe:
            for i, kind in enumerate(self.kind_of):
                if kind[1]:
                    self.holders[i] = {w: (self.params[i][f"ffn.{w}"], W.grad_holder(self.params[i][f"ffn.{w}"]))
                                       for w in ("w_up", "w_down")}
        return 2 * len(self.holders)

    def low_grads(self) -> dict[int, torch.Tensor]:
        """{id(master): its bf16 gradient} where holders took the gradients (`use_low_grads`) and a
        backward wrote them: the masters' gradients, for `FastMuonAdamW.step(grads=...)`."""
        return {id(master): holder.grad for layer in self.holders.values() for master, holder in layer.values()
                if holder.grad is not None}

    def clear_low_grads(self) -> None:
        for layer in self.holders.values():
            for _, holder in layer.values():
                holder.grad = None

    def head_low(self) -> torch.Tensor | None:
        """The output head's kept bf16 copy (`use_weight_copies`), current as of the last forward's
        refresh, or None: what the loss takes as `head_low` instead of casting the head."""
        return None if self.head_copy is None else self.head_copy[1]

    def _copy_entries(self) -> list[list]:
        head = [] if self.head_copy is None else [self.head_copy]
        return [entry for layer in self.copies.values() for entry in layer.values()] + head

    def refresh_stale_copies(self) -> int:
        """Cast again every copy whose master changed since it was written; returns how many."""
        stale = [entry for entry in self._copy_entries() if entry[2] != entry[0]._version]
        with torch.no_grad():
            for entry in stale:
                entry[1].copy_(entry[0])
        self.mark_copies_current()
        return len(stale)

    def mark_copies_current(self) -> None:
        """The masters' updater wrote their copies too (the optimizer step): take the versions as current."""
        for entry in self._copy_entries():
            entry[2] = entry[0]._version

    def lean_blocks(self) -> int:
        """How many blocks compile with the lean partitioner option (those that keep activations)."""
        return sum(kind[3] for kind in self.kind_of)

    def compile_modes(self) -> dict:
        return {str(k): f.mode for k, f in self.fns.items()}

    def doc_masks(self, doc_ids: torch.Tensor):
        """(doc buffer, local mask, global mask) for this shape, rebuilt from doc_ids."""
        key = tuple(doc_ids.shape)
        dm = self._masks.get(key)
        if dm is None:
            dm = self._masks[key] = FX.DocMasks(key, doc_ids.device, self.cfg.window, static=self.static_masks)
        dm.update(doc_ids)
        return dm.doc, dm.local, dm.glob

    def __call__(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None):
        model, cfg = self.model, self.cfg
        if doc_ids is None:
            doc_ids = torch.zeros_like(tokens)
        if self.flex:
            doc_ids, local, glob = self.doc_masks(doc_ids)
        else:
            local = glob = None
        pos = M.positions_from_docs(doc_ids)
        weight = model.embed.weight
        if self.embed_rows and torch.is_grad_enabled() and weight is not model.lm_head.weight:
            # the lookup's own gradient, not a [V, d] one (`embedding_row_grads`); eager: no backward
            x = _embed(weight.detach(), tokens).requires_grad_()
            self.embed_out, self.embed_tokens = x, tokens
        else:
            x = self.embed(weight, tokens)
            if torch.is_grad_enabled():  # a no-grad forward (an evaluation) keeps a pending step's rows
                self.embed_out = self.embed_tokens = None
        v_first, auxes, loads = None, [], []
        probing = self.grad_sq and not self.fused_moe and torch.is_grad_enabled()
        self.sq_probes = []
        # the embedding's part of the norm comes from the rows of these tokens (`known_grad_sq`)
        self.sq_tokens = tokens if self.grad_sq and torch.is_grad_enabled() else None
        self.refresh_stale_copies()
        if self.dense_copies is not None:
            self.dense_copies.cast()  # the masters may have changed since the last forward
        for i, block in enumerate(model.layers):
            kind = self.kind_of[i]
            mask, slopes = (glob, self.slopes) if kind[0] else (local, None)
            params = self.params[i]
            if probing and kind[1]:
                probes = {f"sq_probe.{w}": K.sq_probe(params[f"ffn.{w}"]) for w in ("w_up", "w_down")}
                self.sq_probes += [(params[f"ffn.{w}"], probes[f"sq_probe.{w}"]) for w in ("w_up", "w_down")]
                params = {**params, **probes}
            if self.dense_copies is not None:
                params = {**params, **self.dense_copies.entries(i)}
            if i in self.copies:
                params = {**params, **{f"low.{w}": e[1] for w, e in self.copies[i].items()}}
            if i in self.holders:  # (with no grad too: the same compiled graph, no second compile)
                params = {**params, **{f"grad_to.{w}": h for w, (_, h) in self.holders[i].items()}}
            args = (params, x, pos, doc_ids, v_first, mask, slopes)
            if i < self.checkpoint and torch.is_grad_enabled():
                # no RNG in a block: skipping the RNG save/restore also keeps CUDA-graph capture legal.
                # No early stop: it ends the recompute by raising through the compiled call, which
                # the compile ladder would take for a compile failure (and a compiled block saves
                # its tensors all at once, so stopping early saves nothing).
                with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                    x, v, aux, load = torch.utils.checkpoint.checkpoint(
                        self.fns[kind], *args, use_reentrant=False, preserve_rng_state=False)
            else:
                x, v, aux, load = self.fns[kind](*args)
            if v_first is None:
                v_first = v
            if aux is not None:
                auxes.append(aux)
                loads.append(load)
        hidden = self.final_norm(x, model.norm.weight, cfg.norm_eps, self.dtype)
        # one sum (a kernel, not one add per layer)
        aux_total = torch.stack(auxes).sum() if auxes else x.new_zeros(())
        expert_load = (torch.stack(loads) if loads else
                       torch.zeros(0, cfg.n_experts, dtype=torch.long, device=x.device))
        return hidden, aux_total * cfg.aux_loss_coef, expert_load


@torch.no_grad()
def update_router_biases(model: M.VpMoE, expert_load: torch.Tensor) -> None:
    """`model.update_router_biases` in two launches (foreach over the layers' bias buffers)."""
    biases = [m.expert_bias for m in model.moe_layers()]
    if not biases:
        return
    load = expert_load.float().to(biases[0].device)
    signs = torch.sign(load.mean(1, keepdim=True) - load) * model.cfg.bias_update_rate
    torch._foreach_add_(biases, list(signs.unbind(0)))

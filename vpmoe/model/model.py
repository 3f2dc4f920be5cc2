"""The vpMoE model, whole and readable in one file: the reference every fast path is tested against.

Design choices (docs/architecture.md is the spec; docs/model.md explains the code):
- Layer i is global when (i + 1) % global_every == 0, else local. Local layers: sliding window of
  `window` keys *including* the current one, Tensor Product Attention (TPA) projections and GRAPE-M
  (rotary with learnable frequencies, shared across heads). Global layers: plain GQA projections and
  GRAPE-A in its ALiBi special case (no rotation, bias -slope_h * (i - j)).
- Every layer: QK-norm (RMSNorm over head_dim), biases on all linears, a learnable per-head softmax
  offset ("sink") that joins the denominator as a value-less column, and a value residual from
  layer 0 (`v = lam * v + (1 - lam) * v1`, `lam` a plain learnable scalar that starts at exactly 1).
- Packed rows: `doc_ids` [B, T] says which document each token belongs to. Attention is allowed
  only within a document, and positions restart at 0 for each document. Padding can be its own
  document (any id); it never leaks into real documents.
- The KV cache stores rotated keys, mixed values, positions and document ids per layer; local
  layers keep only the last `window` entries. Prefill and decode run through the same attention,
  so cached decoding reproduces the full forward. An eval-mode forward through a cache (sampling)
  skips the MoE balance statistics (aux loss 0, no expert loads): nothing reads them there.
- MoE: fp32 sigmoid router; selection uses scores + a per-expert bias that is a buffer (never
  trained by gradient, moved by `update_router_biases`); group-limited top-k; combine weights are
  the unbiased scores of the chosen experts normalised to sum 1, times `route_scale`. The routed
  computation goes through `moe.dispatcher` so expert parallelism and grouped-GEMM kernels can
  replace it; the default here is a plain loop over experts.
- Attention here materialises the [T, S] scores in fp32: clear, exact, slow. The fast paths live
  beside it (vpmoe/model/kernels.py) and are tested against these functions.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpmoe.config import ModelConfig, checkpointed_blocks
# the model's contract with a KV cache lives in cache.py; re-exported here, where callers found it
from vpmoe.model.cache import KVCache, chunk_positions, slot_dim, slot_shape  # noqa: F401


# ----------------------------------------------------------------------------------------------
# small pieces


def wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision math (norms, softmax, router), but keep fp64 for float64 checks."""
    return t if t.dtype == torch.float64 else t.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32; torch's op is one fused kernel on CUDA where
        # the written-out form is five (a decode step runs four norms per layer)
        return F.rms_norm(wide(x), (x.shape[-1],), wide(self.weight), self.eps).to(x.dtype)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class FFN(nn.Module):
    """`down(relu(up(x) + b_up)^2) + b_down`: the dense layer and the shared expert."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.up = nn.Linear(d_model, width, bias=True)
        self.down = nn.Linear(width, d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(squared_relu(self.up(x)))


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes: a geometric sequence 2^(-8/n), interleaved for non-powers of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


_SLOPES_ON: dict[tuple[int, str], torch.Tensor] = {}


def alibi_slopes_on(n_heads: int, device: torch.device) -> torch.Tensor:
    """`alibi_slopes` on `device`, copied there once: a forward makes no host-to-device copy (a
    captured decode step, `generate.CapturedDecode`, could not hold one)."""
    key = (n_heads, str(device))
    if key not in _SLOPES_ON:
        _SLOPES_ON[key] = alibi_slopes(n_heads).to(device)
    return _SLOPES_ON[key]


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def grape_log_freq_init(cfg: ModelConfig) -> torch.Tensor:
    """GRAPE-M's learnable log-frequencies at init (fp32): RoPE's, scaled by grape_log_scale."""
    return (rope_inv_freq(cfg.head_dim, cfg.rope_base).log() * cfg.grape_log_scale).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs (i, i + D/2) of x [..., D] by angles given as cos/sin [..., D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_cos_sin(positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin [B, 1, T, D/2] of the angles pos * freq, in fp32 (fp64 for fp64 `dtype`)."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    angles = positions.to(dt)[:, None, :, None] * freq.to(dt)[None, None, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, h, T, D] by angle pos * freq (half-split pairs (i, i + D/2)), in fp32 (fp64 for fp64 x)."""
    cos, sin = rotary_cos_sin(positions, freq, x.dtype)
    return rotate(x.to(cos.dtype), cos, sin).to(x.dtype)


def positions_from_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: index minus the document's first index."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def attention_reference(q, k, v, sinks, q_pos, k_pos, q_doc, k_doc, window: int | None,
                        slopes: torch.Tensor | None) -> torch.Tensor:
    """Plain attention with sinks, document mask, optional window and ALiBi, in fp32.

    q [B, H, T, D]; k, v [B, G, S, D]; sinks [H]; *_pos / *_doc [B, T] or [B, S].
    Query i sees key j when they share a document, pos_j <= pos_i and (local) pos_i - pos_j < window.
    """
    B, H, T, D = q.shape
    G = k.shape[1]
    # query head h reads key/value head h // (H / G): grouped, not repeated, so k and v are read
    # once per kv head (a decode step over a long cache would otherwise copy them H / G times)
    qg = wide(q).view(B, G, H // G, T, D)
    scores = torch.einsum("bgrtd,bgsd->bgrts", qg, wide(k)).reshape(B, H, T, -1) / math.sqrt(D)
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).to(scores.dtype)  # [B, T, S]
    allowed = (q_doc[:, :, None] == k_doc[:, None, :]) & (dist >= 0)
    if window is not None:
        allowed &= dist < window
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).view(1, H, 1, 1) * dist[:, None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    sink_col = sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bgrts,bgsd->bgrtd", probs.reshape(B, G, H // G, T, -1), wide(v))
    return out.reshape(B, H, T, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.is_global = cfg.is_global(layer)
        H, G, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        if self.is_global:
            self.wq = nn.Linear(d, H * D, bias=True)
            self.wk = nn.Linear(d, G * D, bias=True)
            self.wv = nn.Linear(d, G * D, bias=True)
        else:  # TPA: per-head factors A (d -> heads * rank) times shared head_dim factors B (d -> rank * D)
            Rq, Rkv = cfg.tpa_q_rank, cfg.tpa_kv_rank
            self.a_q = nn.Linear(d, H * Rq, bias=False)
            self.b_q = nn.Linear(d, Rq * D, bias=False)
            self.a_k = nn.Linear(d, G * Rkv, bias=False)
            self.b_k = nn.Linear(d, Rkv * D, bias=False)
            self.a_v = nn.Linear(d, G * Rkv, bias=False)
            self.b_v = nn.Linear(d, Rkv * D, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(H * D))
            self.k_bias = nn.Parameter(torch.zeros(G * D))
            self.v_bias = nn.Parameter(torch.zeros(G * D))
            # GRAPE-M: learnable log-frequencies, scaled so they move at a sensible rate; fp32
            self.log_freq = nn.Parameter(grape_log_freq_init(cfg))
        self.wo = nn.Linear(H * D, d, bias=True)
        self.q_norm = RMSNorm(D, cfg.norm_eps)
        self.k_norm = RMSNorm(D, cfg.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.value_mix = nn.Parameter(torch.ones(())) if layer > 0 else None

    def grape_freq(self) -> torch.Tensor:
        return torch.exp(wide(self.log_freq) / self.cfg.grape_log_scale)

    def project_qkv(self, x: torch.Tensor):
        """x [B, T, d] -> q [B, T, H, D], k, v [B, T, G, D] (biases added, before norm/rotation)."""
        B, T, _ = x.shape
        H, G, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        if self.is_global:
            return self.wq(x).view(B, T, H, D), self.wk(x).view(B, T, G, D), self.wv(x).view(B, T, G, D)
        Rq, Rkv = self.cfg.tpa_q_rank, self.cfg.tpa_kv_rank
        q = tpa_product(self.a_q(x).view(B, T, H, Rq), self.b_q(x).view(B, T, Rq, D)) + self.q_bias.view(H, D)
        k = tpa_product(self.a_k(x).view(B, T, G, Rkv), self.b_k(x).view(B, T, Rkv, D)) + self.k_bias.view(G, D)
        v = tpa_product(self.a_v(x).view(B, T, G, Rkv), self.b_v(x).view(B, T, Rkv, D)) + self.v_bias.view(G, D)
        return q, k, v

    def forward(self, x, positions, doc_ids, v_first, cache: KVCache | None = None):
        """Returns (output [B, T, d], this layer's pre-mix values v [B, G, T, D] for layer 0)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(k).transpose(1, 2)  # [B, G, T, D]
        v = v.transpose(1, 2)
        v_raw = v
        if self.value_mix is not None:
            lam = self.value_mix.to(v.dtype)
            v = lam * v + (1 - lam) * v_first
        if not self.is_global:
            cos, sin = rotary_cos_sin(positions, self.grape_freq(), q.dtype)  # once for q and k
            q, k = (rotate(t.to(cos.dtype), cos, sin).to(t.dtype) for t in (q, k))
        k_pos, k_doc = positions, doc_ids
        if cache is not None:
            k, v, k_pos, k_doc = cache.update(self.layer, k, v, positions, doc_ids)
        window = None if self.is_global else self.cfg.window
        slopes = alibi_slopes_on(self.cfg.n_heads, x.device) if self.is_global else None
        out = ATTENTION_IMPLS[self.impl](q, k, v, self.sinks, positions, k_pos, doc_ids, k_doc, window, slopes)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.wo(out), v_raw

    impl = "reference"


def tpa_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TPA: head h's vector = (1/R) * sum_r a[h, r] * b[r, :]. a [B, T, h, R], b [B, T, R, D]."""
    return torch.matmul(a, b) / a.shape[-1]


ATTENTION_IMPLS = {"reference": attention_reference}


# ----------------------------------------------------------------------------------------------
# mixture of experts


def route_reference(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor,
                    cfg: ModelConfig):
    """Group-limited sigmoid routing in fp32.

    Returns topk_idx [N, k], topk_weight [N, k] (fp32, sums to route_scale) and scores [N, E]
    (unbiased sigmoid scores, for the aux loss).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = torch.sigmoid(wide(x) @ wide(router_weight).t())
    N, E = scores.shape
    biased = scores + expert_bias.to(scores.dtype)  # bias steers selection only; never a combine weight
    grouped = biased.view(N, cfg.n_groups, E // cfg.n_groups)
    group_score = grouped.topk(cfg.top_k // cfg.topk_groups, dim=-1).values.sum(-1)  # [N, n_groups]
    keep_groups = group_score.topk(cfg.topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask.repeat_interleave(E // cfg.n_groups, dim=1)
    topk_idx = biased.masked_fill(~expert_mask, float("-inf")).topk(cfg.top_k, dim=-1).indices
    chosen = scores.gather(1, topk_idx)
    topk_weight = chosen / chosen.sum(-1, keepdim=True) * cfg.route_scale
    return topk_idx, topk_weight, scores


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_rows: int, cfg: ModelConfig):
    """DeepSeek-V3 sequence-wise balance loss, one 'sequence' per batch row, averaged over rows.

    f_e = E / (k * T) * (selections of e in the row), P_e = mean_t s_e / sum_e' s_e'; L = sum_e f_e P_e.
    """
    N, E = scores.shape
    T = N // n_rows
    probs = (scores / scores.sum(-1, keepdim=True)).view(n_rows, T, E).mean(1)
    counts = torch.zeros(n_rows, E, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, topk_idx.view(n_rows, T * cfg.top_k),
                        torch.ones(n_rows, T * cfg.top_k, device=scores.device, dtype=scores.dtype))
    return balance_loss(probs, counts, T, cfg)


def balance_loss(probs: torch.Tensor, counts: torch.Tensor, T: int, cfg: ModelConfig) -> torch.Tensor:
    """sum_e f_e P_e averaged over rows, from each row's P [rows, E] and selection counts [rows, E]
    (f_e = E / (k * T) * counts): `sequence_aux_loss`'s last step, shared with the fused router's."""
    f = counts.to(probs.dtype) * probs.shape[-1] / (cfg.top_k * T)
    return (f * probs).sum(-1).mean()


def experts_loop(moe: "MoE", x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Reference dispatcher: for each local expert, gather its tokens, run it, scatter-add back."""
    y = torch.zeros_like(x)
    first, last = moe.expert_range
    for e in range(first, last):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        i = e - first
        h = squared_relu(x[tok] @ moe.w_up[i].to(x.dtype) + moe.b_up[i].to(x.dtype))
        out = h @ moe.w_down[i].to(x.dtype) + moe.b_down[i].to(x.dtype)
        y.index_add_(0, tok, out * topk_weight[tok, slot, None].to(x.dtype))
    return y


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, d, H = cfg.n_experts, cfg.d_model, cfg.expert_ffn
        self.router = nn.Linear(d, E, bias=False)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))  # not a parameter
        self.w_up = nn.Parameter(torch.empty(E, d, H))
        self.b_up = nn.Parameter(torch.zeros(E, H))
        self.w_down = nn.Parameter(torch.empty(E, H, d))
        self.b_down = nn.Parameter(torch.zeros(E, d))
        self.shared = FFN(d, cfg.shared_ffn)
        self.expert_range = (0, E)  # which global experts this module holds (expert parallelism)
        self.dispatcher = experts_loop

    def forward(self, x: torch.Tensor, stats: bool = True):
        """(output, aux loss, expert loads); with `stats` False (sampling through a cache, where
        nothing reads them) the balance statistics are skipped: (output, None, None)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        topk_idx, topk_weight, scores = route_reference(flat, self.router.weight, self.expert_bias, self.cfg)
        routed = self.dispatcher(self, flat, topk_idx, topk_weight)
        out = (self.shared(flat) + routed).view(B, T, d)
        if not stats:
            return out, None, None
        aux = sequence_aux_loss(scores, topk_idx, B, self.cfg) if self.cfg.aux_loss_coef > 0 else scores.new_zeros(())
        flat_idx = topk_idx.flatten()  # scatter_add, not bincount: a static shape for torch.compile
        load = torch.zeros(self.cfg.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))
        return out, aux, load


# ----------------------------------------------------------------------------------------------
# the model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe(layer) else FFN(cfg.d_model, cfg.dense_ffn)

    def forward(self, x, positions, doc_ids, v_first, cache=None):
        a, v = self.attn(self.attn_norm(x), positions, doc_ids, v_first, cache)
        x = x + a
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            # sampling (eval mode, through a cache): no aux loss or loads, ~10% of a decode step's kernels
            f, aux, load = self.ffn(h, stats=cache is None or self.training)
        else:
            f, aux, load = self.ffn(h), None, None
        return x + f, v, aux, load


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor
    aux_loss: torch.Tensor
    expert_load: torch.Tensor  # [n_moe_layers, n_experts] tokens routed per expert
    cache: KVCache | None = None

    @property
    def last_hidden_state(self) -> torch.Tensor:  # the name HF code reads from a base model
        return self.hidden


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter: its own stream, whatever else the model holds."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def initial_value(cfg: ModelConfig, name: str, shape: tuple, seed: int, device) -> torch.Tensor:
    """The initial fp32 value of parameter `name` (its full shape): Normal(0, init_std) weights,
    output projections scaled by 1/sqrt(2 * layers), zero biases and sinks, ones for norms and
    value mixes, RoPE log-frequencies for GRAPE. Drawn from a generator seeded by (seed, name)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "log_freq":
        return grape_log_freq_init(cfg).to(device)
    if leaf == "value_mix" or ("norm" in name and leaf == "weight"):
        return torch.ones(shape, device=device)
    if leaf == "sinks" or leaf.startswith("b_") or leaf.endswith("bias"):
        return torch.zeros(shape, device=device)
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if (".wo." in name or ".down." in name or leaf == "w_down") \
        else cfg.init_std
    gen = torch.Generator(device=device).manual_seed(_name_seed(seed, name))
    return torch.randn(shape, generator=gen, device=device) * std


class VpMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, init_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        # drawn first, from the CPU generator, so `torch.manual_seed(s)` fixes the weights whichever
        # device the model is built on (or "meta": initialised later by reset_parameters)
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu")) if init_seed is None else init_seed
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing: bool | int = False  # see checkpointed_blocks
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from `initial_value` (seeded per parameter name by `init_seed`), router
        biases zero. Sharded parameters (FSDP2 / expert-parallel DTensors) get their shard of the
        same full tensor, so the weights do not depend on the number of ranks or the parallelism;
        one full tensor exists at a time. The draws happen on the parameter's device (a CPU and a
        GPU generator give different numbers for the same seed)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in self.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            full = initial_value(self.cfg, name, tuple(p.shape), self.init_seed, local.device)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            local.copy_(full)
        for layer in self.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.expert_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.cfg, batch_size)

    def set_impl(self, attention: str = "reference", moe=None) -> None:
        """Choose the attention kernel by name and, optionally, the MoE dispatcher callable."""
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {attention!r}; have {sorted(ATTENTION_IMPLS)}")
        for block in self.layers:
            block.attn.impl = attention
            if moe is not None and isinstance(block.ffn, MoE):
                block.ffn.dispatcher = moe

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> ModelOutput:
        """input_ids [B, T]. `doc_ids` packs documents; `attention_mask` (1 real, 0 pad) marks padding.

        With a cache, input_ids are the new tokens: positions continue from the cache, and padding
        (attention_mask 0, e.g. left padding in batched generation) is kept out of attention.
        """
        if cache is None:
            if doc_ids is None:
                doc_ids = torch.zeros_like(input_ids)
            if attention_mask is not None:  # padding is a document of its own
                doc_ids = torch.where(attention_mask.bool(), doc_ids, torch.full_like(doc_ids, -1))
            positions = positions_from_docs(doc_ids)
        else:
            if doc_ids is not None:
                raise ValueError("packed doc_ids are not supported with a KV cache (one document per row)")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            if attention_mask is not None:
                cache.note_mask(mask)
            positions, doc_ids = cache.advance(mask)
        x = self.embed(input_ids)
        v_first = None
        aux_total = x.new_zeros((), dtype=torch.float32)
        loads = []
        n_checkpointed = checkpointed_blocks(self.gradient_checkpointing, len(self.layers))
        for i, block in enumerate(self.layers):
            if i < n_checkpointed and self.training and cache is None:
                x, v, aux, load = torch.utils.checkpoint.checkpoint(
                    block, x, positions, doc_ids, v_first, None, use_reentrant=False)
            else:
                x, v, aux, load = block(x, positions, doc_ids, v_first, cache)
            if v_first is None:
                v_first = v
            if aux is not None:
                aux_total = aux_total + aux
                loads.append(load)
        hidden = self.norm(x)
        logits = None if return_hidden else self.lm_head(hidden)
        expert_load = (torch.stack(loads) if loads else
                       torch.zeros(0, self.cfg.n_experts, dtype=torch.long, device=x.device))
        return ModelOutput(logits, hidden, aux_total * self.cfg.aux_loss_coef, expert_load, cache)

    @torch.no_grad()
    def update_router_biases(self, expert_load: torch.Tensor, rate: float | None = None) -> None:
        """Aux-loss-free balancing: b_e += rate * sign(mean_load - load_e), per MoE layer
        (rate: `bias_update_rate` unless given).

        `expert_load` [n_moe_layers, n_experts] must be the step's loads summed over all
        micro-batches and data-parallel ranks, so every rank applies the same update.
        """
        rate = self.cfg.bias_update_rate if rate is None else rate
        for moe, load in zip(self.moe_layers(), expert_load):
            load = load.float().to(moe.expert_bias.device)
            moe.expert_bias.add_(rate * torch.sign(load.mean() - load))

"""Muon for hidden matrices, AdamW for everything else, in one `torch.optim.Optimizer`.

Design choices:
- One optimizer object with two kinds of param groups (`kind = "muon" | "adamw"`), so DCP's
  `get/set_optimizer_state_dict` checkpoint it like any torch optimizer and one lr schedule drives it.
- Which parameters get Muon: every parameter with 2 or more dimensions except the input embedding
  and the output head (their rows are per-token vectors, not a linear map between hidden spaces).
  That covers attention projections (GQA and the TPA factors), dense/shared FFN linears, the router
  (configurable: `optim.router_muon`), and the routed experts' 3-D tensors `w_up [E, d, H]` /
  `w_down [E, H, d]`, treated as a batch of E independent matrices (Newton-Schulz runs batched
  over the leading dimension; a test checks batch == per-matrix). AdamW gets the embeddings, head,
  norms, biases (including the experts' 2-D `b_up`/`b_down`, which are per-expert vectors), sinks,
  GRAPE log-frequencies and value-residual mixes.
- Muon update: momentum `m = mu * m + g`, Nesterov `u = g + mu * m`, orthogonalise each matrix
  with 5 quintic Newton-Schulz iterations, scale by `0.2 * sqrt(max(rows, cols))` so its RMS
  matches AdamW's (Moonlight's rule: one lr works for both kinds), decoupled weight decay.
  Newton-Schulz runs in bf16 on CUDA (as in the public Muon implementations) and fp32 on CPU.
- Optimizer state is stored in bf16 by default (masters stay fp32). Why that loses nothing here:
  every stored state is an exponential average whose per-step change is (1 - beta) = 5-10% of its
  size, far above bf16's 2^-9 relative rounding, so nothing stagnates; a 300-step CPU comparison
  agreed with fp32 state within the seeds' spread (docs/LOG.md, 2026-12-07). What it buys: 4 GiB
  and 5% of the 20-layer one-GPU step (measured, docs/performance.md), 12.8 GB at 80 layers (by
  count). `float32` keeps the old storage (the path-equivalence tests use it: bf16 state turns two
  paths' fp32 rounding differences into whole bf16 steps of a moment).
- `muon_momentum_dtype = "bfloat16"` stores the Muon momentum in bf16 (2 bytes per Muon parameter
  instead of 4: -11 GB for vpMoE's 5.6B Muon parameters, and less optimizer memory traffic). The
  recurrence is computed in fp32 from the stored value and rounded once when stored; the Nesterov
  update uses the unrounded value. Muon orthogonalises the update, so its direction matters, not
  the last bits (NS itself runs in bf16 on CUDA).
- `adamw_moments_dtype = "bfloat16"` stores the AdamW moments of the input embedding and the output
  head in bf16 (their own param group: 2 x 206M parameters in vpMoE, all but ~0.1% of the AdamW
  state; the small tensors keep fp32 moments). Same treatment: each recurrence computed in fp32
  from the stored value, rounded once when stored, the update from the unrounded values. Bf16
  moments are what DeepSeek-V3 trains with (its report: no observable degradation).
- FSDP2 / expert parallelism: parameters may be DTensors. All arithmetic runs on local shards;
  optimizer state is created with `zeros_like(param)` so it carries the same placements and DCP
  saves it sharded. A tensor sharded only on dim 0 with 3+ dims (experts under FSDP2 or EP) holds
  whole matrices locally, so it is orthogonalised without communication. A 2-D matrix sharded by
  rows is all-gathered (`full_tensor`), orthogonalised redundantly on every rank (identical
  results), and each rank keeps its own row chunk. For vpMoE the gathered matrices are the small
  attention/router/shared-FFN ones; the 5.4B expert parameters never move.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from vpmoe.config import ConfigError

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic iteration tuned for fast convergence of singular values
# the half-precision Gram-side iteration restarts before these steps (optim_fast, expert_muon)
GRAM_RESTART_AT = (2,)
ADAMW_ONLY = ("embed.weight", "lm_head.weight")
EXPERT_BIASES = ("b_up", "b_down")  # [E, width]: a vector per expert, not a matrix
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # stored optimizer state (fp32 params)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak lr of the Muon groups
    adamw_lr: float = 3e-3  # peak lr of the AdamW groups
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_momentum_dtype: str = "bfloat16"  # bfloat16 | float32 (the stored Muon momentum; see above)
    adamw_moments_dtype: str = "bfloat16"  # bfloat16 | float32 (the embedding's and head's AdamW moments)
    ns_steps: int = 5
    muon_weight_decay: float = 0.1
    adamw_weight_decay: float = 0.0
    router_muon: bool = True  # router weight by Muon (True) or AdamW (False)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)

    def validate(self) -> None:
        for name in ("lr", "adamw_lr", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        for name in ("muon_momentum_dtype", "adamw_moments_dtype"):
            if getattr(self, name) not in STATE_DTYPES:
                raise ConfigError(f"{name}: expected one of {sorted(STATE_DTYPES)}, got {getattr(self, name)!r}")
        if self.ns_steps < 1:
            raise ConfigError(f"ns_steps: must be >= 1, got {self.ns_steps}")
        if self.grad_clip < 0 or self.muon_weight_decay < 0 or self.adamw_weight_decay < 0:
            raise ConfigError("grad_clip / weight decays: must be >= 0")


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise each matrix in g [..., m, n]: U S V^T -> U S' V^T with S' near 1.

    Batched over leading dims; each matrix is normalised by its own Frobenius norm, so the result
    for a batch equals the result for each matrix alone. `dtype`: the iteration's (None: bf16 on
    CUDA, fp32 on the CPU); torch.float64 is the fast paths' accuracy reference.
    """
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def muon_scale(shape: torch.Size) -> float:
    """Moonlight's RMS match: an orthogonal m x n update has RMS 1/sqrt(max(m, n))."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole_matrices_local(p: torch.Tensor) -> bool:
    """True when each rank's local shard of p holds whole matrices (no gather needed)."""
    if not isinstance(p, DTensor):
        return True
    for placement in p.placements:
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and placement.dim == 0 and p.ndim >= 3:
            continue
        return False
    return True


def orthogonalised_update(p: torch.Tensor, update: torch.Tensor, steps: int) -> torch.Tensor:
    """The local shard of NS(update) for parameter p (update is the local shard of the momentum)."""
    if _whole_matrices_local(p):
        return newton_schulz(update, steps)
    full = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    ortho = newton_schulz(full, steps)
    # every rank computed the same full matrix; keep this rank's chunk without communication
    return distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()


def split_params(model: nn.Module, router_muon: bool = True) -> tuple[list, list]:
    """(muon, adamw) lists of (name, param), by the rule in the module docstring."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_router = name.endswith("router.weight")
        is_bias = leaf in EXPERT_BIASES or leaf.endswith("bias")
        if p.ndim >= 2 and not is_bias and name not in ADAMW_ONLY and (router_muon or not is_router):
            muon.append((name, p))
        else:
            adamw.append((name, p))
    return muon, adamw


class MuonAdamW(torch.optim.Optimizer):
    """Groups carry `kind`; `base_lr` is the peak lr that the schedule multiplies into `lr`."""

    def __init__(self, param_groups: list[dict]):
        defaults = dict(lr=1e-3, base_lr=1e-3, weight_decay=0.0, kind="adamw", betas=(0.9, 0.95), eps=1e-8,
                        momentum=0.95, nesterov=True, ns_steps=5, momentum_dtype="float32", state_dtype="float32")
        super().__init__(param_groups, defaults)
        self.changed_on_load: list[str] = []  # settings the run config changed since the loaded checkpoint

    def load_state_dict(self, state_dict: dict) -> None:
        """State tensors come from the checkpoint; settings (lr, decay, betas, momentum, Newton-Schulz
        steps, the state's dtypes) stay this optimizer's, i.e. the run config's: torch would
        otherwise restore the saved ones and silently ignore a changed config on resume (e.g. bf16
        momentum chosen to fit memory). What changed is kept in `changed_on_load` for the log.
        The Muon momentum and AdamW moments are then stored in the configured dtypes (torch loads
        floating state in the parameter's dtype; bf16 -> fp32 -> bf16 is exact, fp32 -> bf16 rounds once)."""
        mine = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        self.changed_on_load = []
        for group, settings in zip(self.param_groups, mine):
            for key, value in settings.items():
                if key != "lr" and group.get(key) != value:  # lr: the schedule's current value
                    self.changed_on_load.append(f"{group['kind']}.{key} {group.get(key)!r} -> {value!r}")
                group[key] = value
            for p in group["params"]:
                state, dtype = self.state.get(p, {}), stored_dtype(p, group)
                for key in ("momentum",) if group["kind"] == "muon" else ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            elif group["kind"] == "adamw":
                self._adamw_group(group)
            else:
                raise ValueError(f"unknown param group kind {group['kind']!r}")

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = new_momentum(p, group)
            g, buf, w = _local(p.grad), _local(state["momentum"]), _local(p)
            if buf.dtype == g.dtype:
                buf.mul_(mu).add_(g)
                m = buf
            else:  # a narrower stored momentum: the recurrence in the gradient's precision, one rounding
                m = buf.to(g.dtype).mul_(mu).add_(g)
                buf.copy_(m)
            update = g.add(m, alpha=mu) if group["nesterov"] else m.clone()
            ortho = orthogonalised_update(p, update, group["ns_steps"])
            if wd:
                w.mul_(1 - lr * wd)
            w.add_(ortho, alpha=-lr * muon_scale(p.shape))

    def _adamw_group(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = new_moments(p, group)
            state["step"] += 1
            t = state["step"].item()
            g, m, v, w = _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), _local(p)
            if m.dtype == g.dtype:
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            else:  # narrower stored moments: each recurrence in the gradient's precision, one rounding
                m_stored, v_stored = m, v
                m = m_stored.to(g.dtype).lerp_(g, 1 - beta1)
                v = v_stored.to(g.dtype).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_stored.copy_(m)
                v_stored.copy_(v)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def stored_dtype(p: torch.Tensor, group: dict) -> torch.dtype:
    """The dtype p's optimizer state is stored in: for an fp32 parameter the group's setting (Muon:
    `momentum_dtype`, AdamW: `state_dtype`), else p's own."""
    key = "momentum_dtype" if group["kind"] == "muon" else "state_dtype"
    return STATE_DTYPES[group.get(key, "float32")] if p.dtype == torch.float32 else p.dtype


def new_momentum(p: torch.Tensor, group: dict) -> torch.Tensor:
    """Zero Muon momentum for p in the group's stored dtype (same placements as p under FSDP2/EP)."""
    return torch.zeros_like(p, dtype=stored_dtype(p, group))


def new_moments(p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero AdamW moments for p in the group's stored dtype (same placements as p)."""
    dtype = stored_dtype(p, group)
    return torch.zeros_like(p, dtype=dtype), torch.zeros_like(p, dtype=dtype)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> MuonAdamW:
    """Groups: Muon; AdamW for the small tensors (fp32 moments); AdamW for the embedding and head
    (`ADAMW_ONLY`, moments in `adamw_moments_dtype`). Empty groups are left out."""
    muon, adamw = split_params(model, cfg.router_muon)
    tables = [(n, p) for n, p in adamw if n in ADAMW_ONLY]
    adamw = [(n, p) for n, p in adamw if n not in ADAMW_ONLY]
    groups = []
    if muon:
        groups.append(dict(params=[p for _, p in muon], kind="muon", lr=cfg.lr, base_lr=cfg.lr,
                           weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                           nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps,
                           momentum_dtype=cfg.muon_momentum_dtype))
    for params, state_dtype in ((adamw, "float32"), (tables, cfg.adamw_moments_dtype)):
        if params:
            groups.append(dict(params=[p for _, p in params], kind="adamw", lr=cfg.adamw_lr, base_lr=cfg.adamw_lr,
                               weight_decay=cfg.adamw_weight_decay, betas=tuple(cfg.betas), eps=cfg.eps,
                               state_dtype=state_dtype))
    return MuonAdamW(groups)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor

"""Expert parallelism: routed experts split over an EP group, tokens moved with all-to-all.

Design choices:
- The model's MoE contract (docs/interfaces.md): routing stays in `MoE.route`/`MoE.forward` on
  every rank for its own tokens; only the routed computation goes through `moe.dispatcher`.
  `apply_expert_parallel` replaces each MoE's expert tensors by this rank's slice of experts
  (`moe.expert_range = (first, last)`), as DTensors sharded on dim 0 over the "ep" mesh dim and
  replicated over "edp", so DCP saves and reshards them like any other parameter and Muon sees
  whole matrices locally. It then installs `EPDispatcher`.
- Dispatch, per MoE layer: sort the (token, slot) assignments by expert id (so they are grouped
  by destination rank), exchange counts, all-to-all the token rows and their expert ids, run the
  local experts on what arrived, all-to-all the outputs back, then weight by the (local) combine
  weights and scatter-add into the token rows. Dropless: split sizes are whatever routing chose.
  The local experts are two grouped GEMMs over the arrived rows (`grouped.grouped_expert_ffn`).
- `AllToAll` is an autograd Function over `torch.distributed.all_to_all_single`: the backward of
  an all-to-all is the all-to-all of the gradients with send and receive splits swapped. Every
  rank runs every MoE layer forward and backward in the same order, so collectives always pair.
- Every local expert runs even on zero rows, so each expert parameter always gets a gradient
  (possibly zero) and all ranks take identical optimizer code paths.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from vpmoe.config import ConfigError
from vpmoe.train.parallel import DistState, expert_param_names


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single along dim 0 with explicit split sizes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def _all_to_all_ints(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(out_splits))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def run_local_experts(moe: nn.Module, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
    """Each row of x through its local expert (squared-ReLU FFN); rows in the input order.
    Two grouped GEMMs over all local experts (`grouped.grouped_expert_ffn`, in the autocast dtype,
    biases inside the GEMMs); `run_local_experts_loop` is the reference and serves an empty input."""
    from vpmoe.model.grouped import grouped_expert_ffn
    from vpmoe.model.kernels import compute_dtype

    if x.shape[0] == 0:
        return run_local_experts_loop(moe, x, local_expert)
    w_up, b_up, w_down, b_down = (_local(getattr(moe, n)) for n in expert_param_names())
    order = torch.argsort(local_expert, stable=True)
    offsets = torch.bincount(local_expert, minlength=w_up.shape[0]).cumsum(0).to(torch.int32)
    y_sorted = grouped_expert_ffn(x[order].to(compute_dtype(x)), offsets, w_up, b_up, w_down, b_down)
    return torch.empty_like(y_sorted).index_copy(0, order, y_sorted).to(x.dtype)


def run_local_experts_loop(moe: nn.Module, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
    """Reference: a loop over the local experts (every expert runs, even on zero rows)."""
    w_up, b_up, w_down, b_down = (_local(getattr(moe, n)) for n in expert_param_names())
    n_local = w_up.shape[0]
    order = torch.argsort(local_expert, stable=True)
    counts = torch.bincount(local_expert, minlength=n_local).tolist()
    outs = []
    for e, rows in enumerate(torch.split(x[order], counts)):
        h = torch.relu(rows @ w_up[e].to(x.dtype) + b_up[e].to(x.dtype)).square()
        outs.append(h @ w_down[e].to(x.dtype) + b_down[e].to(x.dtype))
    y_sorted = torch.cat(outs)
    return torch.empty_like(y_sorted).index_copy(0, order, y_sorted)


class EPDispatcher:
    """`moe.dispatcher` for expert parallelism over `group` (this rank holds moe.expert_range)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, moe: nn.Module, x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weight: torch.Tensor) -> torch.Tensor:
        n_tokens, k = topk_idx.shape
        first, last = moe.expert_range
        per_rank = last - first
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # grouped by expert, hence by destination rank
        expert_sorted = flat[order]
        token_sorted = order // k
        send = torch.bincount(expert_sorted // per_rank, minlength=self.size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        # under autocast the experts compute in bf16 anyway: send bf16 rows (half the traffic)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows_in = AllToAll.apply(x[token_sorted].to(dt), recv_splits, send_splits, self.group)
        expert_in = _all_to_all_ints(expert_sorted, recv_splits, send_splits, self.group)
        rows_out = run_local_experts(moe, rows_in, expert_in - first)
        back = AllToAll.apply(rows_out, send_splits, recv_splits, self.group)
        weight = topk_weight.reshape(-1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add(0, token_sorted, back.to(x.dtype) * weight[:, None])


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, ds: DistState) -> None:
    """Keep only this rank's experts (as DTensors over ds.ep_mesh) and install the EP dispatcher.

    Call on a model initialised identically on every rank (same seed), before FSDP2 sharding.
    """
    if ds.ep_mesh is None:
        return
    ep, ep_rank = ds.ep_size, ds.ep_rank
    dispatcher = EPDispatcher(ds.ep_mesh.get_group("ep"))
    for moe in model.moe_layers():
        n_experts = moe.w_up.shape[0]
        if n_experts % ep != 0:
            raise ConfigError(f"parallel.expert_parallel={ep} does not divide model.n_experts={n_experts}")
        per_rank = n_experts // ep
        first = ep_rank * per_rank
        for name in expert_param_names():
            full = getattr(moe, name)
            local = full.detach()[first:first + per_rank].clone()
            dt = DTensor.from_local(local, ds.ep_mesh, [Replicate(), Shard(0)], run_check=False,
                                    shape=full.shape, stride=full.stride())
            setattr(moe, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        moe.expert_range = (first, first + per_rank)
        moe.dispatcher = dispatcher

"""Process groups, device meshes, FSDP2 sharding and the distributed reductions the trainer needs.

Design choices:
- Launch is always torchrun (or a single plain process): `init_distributed` reads RANK /
  WORLD_SIZE / LOCAL_RANK, picks NCCL on CUDA and gloo on CPU, and builds the meshes. Multi-node
  is torchrun's rendezvous; nothing here knows about nodes.
- Data parallel is FSDP2 (`fully_shard`) over all ranks: each transformer block is its own unit,
  then the root (embedding, final norm, head). The trainer normalises every micro-batch loss by
  the global batch's token counts, so the gradient of the global loss is the *sum* of per-rank
  gradients; FSDP2 averages, so the trainer multiplies the loss by the world size
  (`GRAD_SCALE`; a custom divide factor would need PREMUL_SUM, which gloo lacks). Gradients
  FSDP2 does not reduce are summed and divided by the world size here, the same convention.
- Mixed precision is `torch.autocast(bf16)` around forward with fp32 parameters (no FSDP param
  cast): the model keeps some parameters deliberately fp32 in use (GRAPE log-frequencies, the
  router) and autocast respects that, at the price of fp32 all-gathers.
- Expert parallelism (`parallel.expert_parallel = ep > 1`) uses a second mesh (world/ep, ep)
  named ("edp", "ep"): experts are split over "ep" (see expert_parallel.py) and replicated over
  "edp"; their gradients are summed over "edp" here. FSDP2 ignores those parameters, and the
  0-D ones (value-residual mixes; FSDP2 cannot shard scalars), which stay replicated with their
  gradients all-reduced here.
- `data_parallel = "replicate"` (models that fit one device): no sharding; every rank runs the
  one-device fused step (FastBody, FastMuonAdamW) on its rows and the gradients are summed by
  all-reduce before the step (`all_reduce_grads`), so the replicas take the same step.
- Global grad norm: local sums of squares, bucketed by the mesh dims they are sharded over, one
  all-reduce per bucket; replicated tensors are counted once.
- Host-side agreement (each step's row count, the stop flag) goes over a gloo group of its own
  (`host_group`, `all_reduce_host`): numbers the host already has are summed on the host, so
  reading the result never waits for the GPU's queue (an NCCL all-reduce and `.item()` would
  idle it every step until the previous step drained).
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from vpmoe.config import ConfigError

DATA_PARALLEL = ("fsdp", "replicate")


@dataclass
class ParallelConfig:
    expert_parallel: int = 1  # size of the expert-parallel group; 1 = experts sharded by FSDP2
    # fsdp: FSDP2 shards every weight over all ranks (any model size); replicate: every rank holds
    # the whole model and runs the one-device fused step, gradients summed by all-reduce (the
    # model, its gradients and optimizer state must fit one device, as on one GPU)
    data_parallel: str = "fsdp"
    reshard_after_forward: bool = True  # FSDP2: free gathered block params after forward
    timeout_minutes: int = 30  # collective timeout (a hung rank fails the job instead of waiting)

    def validate(self) -> None:
        if self.expert_parallel < 1:
            raise ConfigError(f"expert_parallel: must be >= 1, got {self.expert_parallel}")
        if self.data_parallel not in DATA_PARALLEL:
            raise ConfigError(f"data_parallel: expected one of {DATA_PARALLEL}, got {self.data_parallel!r}")
        if self.data_parallel == "replicate" and self.expert_parallel > 1:
            raise ConfigError("data_parallel = \"replicate\" keeps every expert on every rank; expert_parallel "
                              f"must be 1 with it (got {self.expert_parallel}): set one or the other")
        if self.timeout_minutes < 1:
            raise ConfigError(f"timeout_minutes: must be >= 1, got {self.timeout_minutes}")


@dataclass
class DistState:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dp_mesh: DeviceMesh | None  # 1-D over all ranks (FSDP2); None when world == 1
    ep_mesh: DeviceMesh | None  # 2-D ("edp", "ep"); None when expert_parallel == 1
    host_group: dist.ProcessGroup | None = None  # gloo over all ranks, for host numbers; None when world == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_size(self) -> int:
        return 1 if self.ep_mesh is None else self.ep_mesh.size(1)

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep_mesh is None else self.ep_mesh.get_local_rank("ep")


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"train.device: expected auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_distributed(device_name: str, cfg: ParallelConfig) -> DistState:
    """Join the torchrun job (if any) and build the meshes. Safe to call once per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    ep = cfg.expert_parallel
    if world % ep != 0:
        raise ConfigError(f"parallel.expert_parallel={ep} does not divide the world size {world}")
    if world == 1:
        return DistState(0, 1, 0, device, None, None)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    dp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = None
    if ep > 1:
        ep_mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    return DistState(rank, world, local_rank, device, dp_mesh, ep_mesh, host_group)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def expert_param_names() -> tuple[str, ...]:
    return ("w_up", "b_up", "w_down", "b_down")


def scalar_params(model: nn.Module) -> list[nn.Parameter]:
    """0-D parameters (e.g. value-residual mixes): FSDP2 cannot shard them, so they stay replicated."""
    return [p for p in model.parameters() if p.ndim == 0]


def shard_model(model: nn.Module, ds: DistState, cfg: ParallelConfig) -> nn.Module:
    """FSDP2 over ds.dp_mesh: one unit per block, then the root.

    Left out (and reduced by `sync_unsharded_grads`): expert-parallel tensors and 0-D parameters.
    With `data_parallel = "replicate"` nothing is sharded (`all_reduce_grads` reduces the gradients).
    """
    if ds.dp_mesh is None or cfg.data_parallel == "replicate":
        return model
    # A block returns the first layer's values as a view of its projection, and FSDP2 warns that an
    # in-place op on a view output could break backward; nothing modifies a block's outputs in
    # place (the residual stream is updated out of place), and 1 rank = N ranks is tested.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    ignored: set[nn.Parameter] = set(scalar_params(model))
    if ds.ep_mesh is not None:
        for moe in model.moe_layers():
            ignored.update(getattr(moe, n) for n in expert_param_names())
    for block in model.layers:
        block_ignored = {p for p in block.parameters() if p in ignored}
        fully_shard(block, mesh=ds.dp_mesh, reshard_after_forward=cfg.reshard_after_forward,
                    ignored_params=block_ignored or None)
    fully_shard(model, mesh=ds.dp_mesh, ignored_params=ignored or None)
    return model


def all_reduce_sum(t: torch.Tensor, ds: DistState) -> torch.Tensor:
    """In-place sum over all ranks (no-op on one rank); returns t."""
    if ds.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_host(values: list[int], ds: DistState) -> list[int]:
    """Each value summed over all ranks, on the host (gloo): no GPU stream is waited on."""
    if ds.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ds.host_group)
    return t.tolist()


def sync_unsharded_grads(model: nn.Module, ds: DistState) -> None:
    """Reduce the gradients FSDP2 leaves alone, like FSDP2 does (sum / world, the loss being
    scaled by the world size): replicated 0-D params over all ranks (one flattened all-reduce),
    expert-parallel tensors over their "edp" replicas (the all-to-all backward already summed
    over the "ep" group)."""
    if ds.world == 1:
        return
    scalars = [p for p in scalar_params(model) if p.grad is not None]
    if scalars:
        flat = torch.stack([p.grad for p in scalars])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(scalars, flat):
            p.grad.copy_(g / ds.world)
    if ds.ep_mesh is None:
        return
    edp = ds.ep_mesh.get_group("edp") if ds.ep_mesh.size(0) > 1 else None
    for moe in model.moe_layers():
        for name in expert_param_names():
            p = getattr(moe, name)
            if p.grad is not None:
                g = p.grad.to_local()
                if edp is not None:
                    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=edp)
                g.div_(ds.world)


COALESCE_BELOW = 1 << 20  # gradients smaller than this many elements share one all-reduce per dtype


def all_reduce_grads(grads: list[torch.Tensor], ds: DistState) -> None:
    """`data_parallel = "replicate"`: every rank's whole gradients summed over all ranks, in place
    (each rank's loss is its part of the global loss, so the sum is the global gradient: no
    scaling of the loss and no division pass over every gradient). Half-precision gradients (the
    experts' bf16 ones) are reduced in fp32 and rounded once: a bf16 ring all-reduce would round at
    every hop. The large tensors one all-reduce each; the small ones (norms, biases, 0-D mixes)
    flattened per reduction dtype into one. Every rank then holds the same gradients, so the same
    optimizer step keeps the replicas equal."""
    if ds.world == 1:
        return
    small: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        wide = torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else g.dtype
        if g.numel() < COALESCE_BELOW:
            small.setdefault(wide, []).append(g)
            continue
        buf = g if wide == g.dtype else g.to(wide)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not g:
            g.copy_(buf)
    for wide, group in small.items():
        flat = torch.cat([g.reshape(-1).to(wide) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(part.view_as(g))


def replicas_agree(tensors: list[torch.Tensor], ds: DistState) -> bool:
    """Whether every rank holds the same `tensors` (the replicas' weights): each rank's float64 sum
    and sum of squares over them, compared by one MAX and one MIN all-reduce. Equal replicas give
    equal sums bit for bit (the same values reduced in the same order)."""
    if ds.world == 1:
        return True
    sums = torch.zeros(2, dtype=torch.float64, device=ds.device)
    for t in tensors:
        for part in t.detach().reshape(-1).split(1 << 24):  # float64 copies of at most 128 MiB at a time
            x = part.double()
            sums += torch.stack([x.sum(), x.square().sum()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_dims(t: torch.Tensor) -> tuple:
    if not isinstance(t, DTensor):
        return ()
    return tuple(i for i, pl in enumerate(t.placements) if isinstance(pl, Shard))


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (plain tensors or DTensors), as an fp32 scalar."""
    buckets: dict[tuple, list] = {}
    for p in params:  # every param makes its bucket, grad or not, so ranks reduce in the same order
        key = (id(p.device_mesh), _sharded_dims(p)) if isinstance(p, DTensor) else (None, ())
        bucket = buckets.setdefault(key, [p, [torch.zeros((), device=_local(p).device)]])
        if p.grad is not None:
            bucket[1].append(_local(p.grad).detach().float().pow(2).sum())
    total = None
    for (_, dims), (example, squares) in buckets.items():
        s = torch.stack(squares).sum()
        for d in dims:  # sum over every mesh dim the tensors are sharded along
            dist.all_reduce(s, op=dist.ReduceOp.SUM, group=example.device_mesh.get_group(d))
        total = s if total is None else total + s.to(total.device)
    if total is None:
        return torch.zeros(())
    return total.sqrt()


def clip_grads(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients so their global norm is at most max_norm (given the precomputed norm)."""
    if max_norm <= 0:
        return
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            g.mul_(coef.to(g.device))

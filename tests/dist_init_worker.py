"""Run under torchrun by tests/test_train_init.py: build a model on "meta" as the trainer does
(expert parallel, FSDP2), materialise and draw it, then write every parameter's full tensor
(gathered) from rank 0 to the path in argv[1]."""
import dataclasses
import sys

import torch

from vpmoe.config import load_model_config
from vpmoe.model.model import VpMoE
from vpmoe.train.expert_parallel import apply_expert_parallel
from vpmoe.train.parallel import ParallelConfig, init_distributed, shard_model, shutdown_distributed


def main(out: str, ep: int) -> None:
    cfg = dataclasses.replace(load_model_config("configs/tiny.toml"), **MODEL)
    ds = init_distributed("cpu", ParallelConfig(expert_parallel=ep))
    torch.manual_seed(5)
    with torch.device("meta"):
        model = VpMoE(cfg)
    apply_expert_parallel(model, ds)
    shard_model(model, ds, ParallelConfig(expert_parallel=ep))
    model.to_empty(device="cpu")
    model.reset_parameters()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    if ds.rank == 0:
        torch.save({"params": full, "local_numel": local_numel}, out)
    shutdown_distributed()


# odd sizes on purpose: FSDP2 and the per-rank draw must agree on uneven dim-0 shards
MODEL = dict(vocab_size=97, d_model=48, n_layers=4, n_heads=3, n_kv_heads=1, head_dim=16, window=8,
             n_experts=6, expert_ffn=24, shared_ffn=40, dense_ffn=40, top_k=2, n_groups=2, topk_groups=1,
             max_seq_len=64)

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

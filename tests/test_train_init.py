"""Initialisation on "meta" across ranks: the trainer's build (meta -> expert parallel -> FSDP2 ->
to_empty -> reset_parameters) gives every parameter exactly the value of a direct one-process
build, on 3 ranks (uneven FSDP2 shards) and on 2 ranks with expert parallelism, while each rank
holds only its shards."""
import subprocess
import sys

import pytest
import torch

from tests.dist_init_worker import MODEL
from tests.test_train_helpers import ROOT, env


@pytest.mark.parametrize("ranks,ep", [(3, 1), (2, 2)])
def test_meta_init_on_ranks_equals_direct_build(tmp_path, ranks, ep):
    import dataclasses

    from vpmoe.config import load_model_config
    from vpmoe.model.model import VpMoE

    out = tmp_path / "params.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(29500 + (hash(str(tmp_path)) % 2000)), str(ROOT / "tests" / "dist_init_worker.py"), str(out), str(ep)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    torch.manual_seed(5)
    direct = VpMoE(dataclasses.replace(load_model_config("configs/tiny.toml"), **MODEL))
    want = dict(direct.named_parameters())
    assert got["params"].keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got["params"][name], value.detach()), name
    total = sum(p.numel() for p in want.values())
    assert got["local_numel"] < 0.6 * total  # rank 0 holds its shards, not the model

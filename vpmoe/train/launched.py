"""A train step queued on the device, and the one read of its figures.

`vpmoe train` reads each step's figures (loss sums, gradient norm, expert loads) one step late:
it queues step N+1 before it reads, checks and logs step N, so the host's logging, router
statistics and batch staging run while the GPU works instead of between its steps (before,
every step ended in a read that left the GPU idle until the host had logged and queued the next
one; TensorBoard alone took ~3-13 ms per logged step on a 2-core host). Design choices:
- The figures travel as one fp64 tensor: a non-blocking copy into pinned host memory queued
  right behind the step, and an event after it; `read` waits on that event only.
- On the CPU the copy is plain (everything there is synchronous anyway).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LaunchedStep:
    step: int  # the step's number (1-based, as logged)
    host: torch.Tensor  # [stats..., grad norm, loads...] fp64, complete once `done` has fired
    done: torch.cuda.Event | None
    n_stats: int
    load_shape: tuple
    lr: float
    rows: int  # rows in the global batch

    @classmethod
    def queue(cls, step: int, stats: torch.Tensor, grad_norm: torch.Tensor, load: torch.Tensor, lr: float,
              rows: int) -> LaunchedStep:
        figures = torch.cat([stats.double(), grad_norm.to(stats.device, torch.float64).view(1),
                             load.double().flatten()])
        done = None
        if figures.is_cuda:
            host = torch.empty(figures.shape, dtype=figures.dtype, pin_memory=True)
            host.copy_(figures, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = figures.cpu()
        return cls(step, host, done, stats.numel(), tuple(load.shape), lr, rows)

    def read(self) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(packed stats, gradient norm, expert loads), once the step has finished."""
        if self.done is not None:
            self.done.synchronize()
        n = self.n_stats
        return self.host[:n], float(self.host[n]), self.host[n + 1:].view(self.load_shape)

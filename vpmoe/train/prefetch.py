"""The next train step's micro-batches, prepared on a background thread while this step runs.

Design choices:
- One worker thread, one step ahead. The loader is touched only by that thread, in step order, so
  the batches are exactly those of a synchronous loop. `produce(step)` returns the step's
  micro-batches and the loader state *after* them; the trainer checkpoints the state returned
  with the last step it consumed, so a resume is exact although one step was read ahead (the
  worker may be mutating the loader when the main thread saves: the main thread never reads it).
- What leaves the critical path: reading the packed rows and, for offline KD, decoding the
  teacher-cache rows with their token checks (`KDObjective.staged_target`, ~1e5-4e5 positions/s
  per core: tens to hundreds of ms per stage-2 step). On a GPU the step runs asynchronously (graph
  replays, kernel launches) and the main thread mostly waits, so that host work overlaps it.
- An exception in the worker (a corrupt cache row naming its file and row, say) is raised in the
  main thread when that step is taken, as the original exception.
- `get` returns how long the trainer waited for the worker (logged as `data_wait_s`: 0 when the
  host work is hidden, the host's share of the step when it is not).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class StepPrefetcher:
    def __init__(self, produce: Callable[[int], tuple[list[dict], dict]], first_step: int, end_step: int):
        """produce(step) -> (micro-batches, loader state after them), for steps first_step..end_step-1."""
        self._produce, self._end, self._next = produce, end_step, first_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpmoe-prefetch")
        self._future = self._submit(first_step)

    def _submit(self, step: int) -> Future | None:
        return self._pool.submit(self._produce, step) if step < self._end else None

    def get(self, step: int) -> tuple[list[dict], dict, float]:
        """(micro-batches, loader state after them, seconds waited) of `step`; starts the next one."""
        if step != self._next or self._future is None:
            raise RuntimeError(f"StepPrefetcher: asked for step {step}, prepared {self._next} (end {self._end})")
        t0 = time.perf_counter()
        batches, state = self._future.result()
        waited = time.perf_counter() - t0
        self._next = step + 1
        self._future = self._submit(step + 1)
        return batches, state, waited

    def close(self) -> None:
        """Stop after the step in flight (its result is dropped); idempotent."""
        if self._future is not None:
            self._future.cancel()
            self._future = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "StepPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

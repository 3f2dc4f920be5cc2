"""Stopping a run on request: SIGTERM / SIGUSR1 are recorded instead of killing the process, so
the trainer finishes the step in flight, agrees with the other ranks to stop after the same step,
checkpoints, and raises `TrainingStopped` (`vpmoe train` exits 75; `--resume` continues).
Cluster schedulers send SIGTERM (or SIGUSR1 ahead of a time limit) before they kill a job.
Ctrl-C (SIGINT) is the same request from a terminal; a second Ctrl-C stops at once
(KeyboardInterrupt, no checkpoint). Where SIGINT is ignored (a background job) it stays ignored.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


class TrainingStopped(RuntimeError):
    """A stop signal arrived; the run checkpointed after the step in flight (the message names it)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals():
    """Record SIGTERM / SIGUSR1 (yielded list of signal numbers) instead of dying; the previous
    handlers come back afterwards. Python delivers signals to the main thread only: elsewhere
    (a caller's thread) nothing is installed."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt(got))
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _interrupt(got: list[int]):
    def handler(signum, frame):
        if signal.SIGINT in got:  # the second Ctrl-C
            raise KeyboardInterrupt
        got.append(signum)
        print("Ctrl-C: stopping after the step in flight, with a checkpoint (Ctrl-C again: stop now, "
              "without one)", file=sys.stderr, flush=True)
    return handler

"""Stop on a scheduler's signal at an iteration boundary, after a checkpoint.

SLURM, Kubernetes and spot instances send SIGTERM, wait a grace period, then kill; `sbatch
--signal` can send SIGUSR1 ahead of the time limit. Either signal only sets a flag here. After
each iteration the processes agree (`requested`) whether any of them got one, so the signal may
reach one worker or all of them through the launcher, and every process then stops after the
same iteration: the loop writes an ordinary step checkpoint and leaves with `RunStopped`.
"""

from __future__ import annotations

import signal
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop flag of this process, and the processes' agreement on it."""

    def __init__(self, accelerator, timeout: timedelta):
        self.accelerator = accelerator
        self.signal_name = ""
        self._group = None
        if accelerator.num_processes > 1:
            # A CPU (gloo) group: agreeing costs no host-device sync on a GPU.
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process got a stop signal (a collective: every process calls it)."""
        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and not self.signal_name:
            self.signal_name = "a signal to another process"
        return bool(flag.item())

    def close(self) -> None:
        """Give the signals back their earlier handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""When a run stops early: a signal (SIGINT / SIGTERM / SIGUSR2) or a non-finite loss.

The loop asks once per iteration whether a signal arrived (under DDP the ranks agree, so all
stop and save at the same iteration), and reads one device flag per log window, evaluation or
checkpoint to learn whether anything went non-finite (never per iteration: no host sync).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

from .distributed import DistInfo, all_reduce_max_
from .step import StepWindow

__all__ = ["StopOnSignals", "agreed_stop", "first_nonfinite"]


class StopOnSignals:
    """SIGINT / SIGTERM / SIGUSR2 set a flag that the loop checks after each iteration; the loop then
    saves a checkpoint and returns. A second signal acts as usual (KeyboardInterrupt / exit),
    except under torchrun (``keep_deferring``): Ctrl-C reaches a worker twice there (from the
    terminal and forwarded by torchrun), and torchrun itself escalates to SIGKILL if need be."""

    # SIGUSR2: Slurm's warning before a preemption or the time limit (sbatch --signal=USR2@T;
    # what submitit asks for): stop, save, and let the job be requeued.
    SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
        (signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()
    )

    def __init__(self, keep_deferring: bool = False) -> None:
        self.received: Optional[str] = None
        self.keep_deferring = keep_deferring
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and self.keep_deferring:
            return
        self.received = signal.Signals(signum).name
        if not self.keep_deferring:
            for sig, handler in self._previous.items():  # the next one is not deferred
                signal.signal(sig, handler)

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_stop(stop: "StopOnSignals", dist_info: DistInfo, device: torch.device) -> Optional[str]:
    """The signal that stops the run; under DDP the ranks agree (a 1-number all-reduce per
    iteration), so that all of them stop, and save, at the same iteration."""
    if not dist_info.enabled:
        return stop.received
    signum = signal.Signals[stop.received].value if stop.received else 0
    agreed = all_reduce_max_(torch.tensor([signum], device=device))
    return signal.Signals(int(agreed.item())).name if agreed.item() else None


def first_nonfinite(
    window: StepWindow, models: tuple, iteration: int, dist_info: DistInfo
) -> Optional[int]:
    """The first iteration whose losses or D outputs were not finite, or None (one host read).
    With ``models``: also their parameters (before an evaluation or a checkpoint reads them),
    counted as non-finite at ``iteration``. Under DDP any rank's counts."""
    flag = window.first_nonfinite
    if models:
        params = [p for m in models for p in m.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
        flag = torch.where(finite | (flag >= 0), flag, iteration)
    if dist_info.enabled:
        flag = all_reduce_max_(flag.reshape(1))[0]
    value = int(flag.item())
    return value if value >= 0 else None

"""Stopping safely: signals ask for a checkpoint at the next step boundary, and every rank
agrees on when to stop and whether a loss went non-finite, without stalling the device."""
import signal
from typing import Optional

import torch
import torch.distributed as dist


class TrainingError(ValueError):
    """A deliberate stop with a one-line explanation (bad data, non-finite loss)."""


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop turns into 'checkpoint, then exit'. A second
    signal exits at once. restore() puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum


class StepGuard:
    """After every optimizer step, queue an all-reduce(max) of two flags (stop requested,
    loss/gradient non-finite) and read the previous step's: the host waits for step s-1 while
    step s runs, never for the step it just queued. flush() reads the pending flags now
    (before a checkpoint, so none holds post-NaN weights)."""

    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.pending = None

    def after_step(self, step: int, finite: torch.Tensor) -> bool:
        """finite: bool scalar tensor on the device. Returns True when all ranks should stop
        now; raises TrainingError naming the first non-finite step."""
        flags = torch.stack([(~finite).float(), torch.full_like(finite, self.stop.requested, dtype=torch.float)])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if dist.is_initialized() else None
        previous, self.pending = self.pending, (step, flags, work)
        return self._read(previous)

    def flush(self) -> bool:
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(pending) -> bool:
        if pending is None:
            return False
        step, flags, work = pending
        if work is not None:
            work.wait()
        nonfinite, stop = flags.tolist()
        if nonfinite:
            raise TrainingError(f"non-finite loss or gradient at step {step}; stopped without saving it (the last "
                                f"checkpoint is intact: lower --lr, or pass --skip-nonfinite N)")
        return bool(stop)

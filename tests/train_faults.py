"""Faults injected into the training loop from outside it, for the resume tests.

`inject(fault, at_step, rank)` wraps autoregressive.train.loop.train_step: once step `at_step`
has finished (the call that would run step at_step + 1 begins) on rank `rank`, the fault fires:
"sigterm" makes the process send itself SIGTERM; "exit" ends it abruptly with status 17, once:
only while the file `marker` does not exist (it is created first); "pause" creates `marker` and
sleeps until killed (a trainer that holds its run folder).

Run as a script, it is train_c2i.py with the fault taken from FAULT, FAULT_AT_STEP, FAULT_RANK
and FAULT_MARKER (for torchrun, whose ranks are separate processes):
    torchrun ... tests/train_faults.py TRAIN_C2I_FLAGS
"""
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.train import loop  # noqa: E402


def faulty(train_step: Callable, fault: str, at_step: int, rank: int = 0, marker: Optional[str] = None) -> Callable:
    if fault not in ("sigterm", "exit", "pause"):
        raise ValueError(f"unknown fault {fault!r}; expected 'sigterm', 'exit' or 'pause'")
    if fault in ("exit", "pause") and marker is None:
        raise ValueError(f"fault {fault!r} needs a marker file")

    def step(t, batches):
        if t.step == at_step and t.info.rank == rank:
            if fault == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif fault == "pause":
                Path(marker).touch()
                while True:
                    time.sleep(1)
            elif not os.path.exists(marker):
                Path(marker).touch()
                os._exit(17)
        return train_step(t, batches)

    return step


def inject(monkeypatch, fault: str, at_step: int, rank: int = 0, marker: Optional[str] = None) -> None:
    monkeypatch.setattr(loop, "train_step", faulty(loop.train_step, fault, at_step, rank, marker))


if __name__ == "__main__":
    loop.train_step = faulty(loop.train_step, os.environ["FAULT"], int(os.environ["FAULT_AT_STEP"]),
                             int(os.environ.get("FAULT_RANK", "0")), os.environ.get("FAULT_MARKER"))
    loop.main(sys.argv[1:])

"""Process-group setup shared by every entry point.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) a program runs as a single
process on CPU or one GPU; under torchrun it joins the process group with NCCL on CUDA and
gloo on CPU, so the distributed code paths run (and are tested) on a laptop.
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' / 'cpu' force one."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join torchrun's process group if launched by it (nccl on CUDA, gloo on CPU), else
    return a single-process DistInfo. Call teardown_distributed() in a finally block."""
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, pick_device(device))
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        store = _elastic_attempt_store(world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def _elastic_attempt_store(world_size: int, timeout: timedelta):
    """torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT and keeps it across
    elastic restarts (--max-restarts). Prefix the keys by restart attempt so a restarted
    group never reads the previous attempt's addresses (torch 2.14 no longer does, and the
    restarted ranks then fail to connect). None when not under a torchrun agent."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"/worker/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over all ranks (no-op without a process group); op: sum, avg, max, min."""
    if not dist.is_initialized():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op == "avg":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.div_(dist.get_world_size())
    dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's `obj` on every rank (picklable objects only; no-op single-process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's `obj` as a list on every rank (single-process: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RefusedOnMain(ValueError):
    """A decision that rank 0 refused, raised on every rank with rank 0's one-line message."""


def decide_on_main(decide: Callable[[], Any], is_main: bool) -> Any:
    """decide() on rank 0 and its result on every rank. A ValueError (or FileNotFoundError)
    raised by decide() is raised on rank 0 and, as RefusedOnMain with the same message, on the
    others, so no rank waits for a decision that never comes."""
    outcome, error = None, None
    if is_main:
        try:
            outcome = ("ok", decide())
        except (ValueError, FileNotFoundError) as e:
            outcome, error = ("refused", str(e)), e
    kind, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if kind == "refused":
        raise RefusedOnMain(value)
    return value

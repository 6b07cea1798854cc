"""Rank/world helpers that work with or without torch.distributed being initialised."""

import os
import socket


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0


def all_reduce(values, op: str = "sum", device=None):
    """Sum (op "sum") or maximum ("max") of a small tensor over all ranks, computed on `device` (the collective's:
    CUDA for NCCL; None: where `values` is) and returned where `values` was; `values` itself on one process."""
    if not is_initialized() or world_size() == 1:
        return values
    import torch.distributed as dist

    reduced = values.to(device) if device is not None else values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return reduced.to(values.device)


def from_rank_zero(value, wait_s: float | None = None):
    """Rank 0's `value` (a picklable object) on every rank; `value` itself on one process (collective).

    wait_s: how long the other ranks may wait for rank 0, when that may be longer than the process group's timeout
    (DeepSpeed's default: 10 minutes); they wait in a gloo group of their own made with that timeout."""
    if not is_initialized() or world_size() == 1:
        return value
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s)) if wait_s else None
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    return box[0]


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it: bind to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

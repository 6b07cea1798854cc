"""Run a function on N gloo ranks (forked, or spawned when this process already joined a process group) and fail the test with the ranks' tracebacks.

    results = run_on_ranks(fn, world_size=2, args=(...,), timeout=240)   # fn(rank, world_size, *args)

Each rank joins a fresh process group through `deepspeed.init_distributed("gloo")` on a free port,
uses DeepSpeed's CPU accelerator and one intra-op thread, and sends back fn's (picklable) return value or its traceback. When a
rank fails, the others get a few seconds and are then terminated (they may be waiting in a collective).
"""

import os
import queue
import time
import traceback

import torch.multiprocessing as mp

from relora_ds.dist import free_port


def _worker(rank, world_size, port, fn, args, results):
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", f"/tmp/torch_extensions_{os.getuid()}")
        os.environ["DS_ACCELERATOR"] = "cpu"  # gloo ranks on CPU, also on a machine with a GPU
        import torch

        torch.set_num_threads(1)
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip its 30-70 s compile

        deepspeed.init_distributed("gloo")
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, "error", traceback.format_exc()))


def run_on_ranks(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0, grace: float = 5.0) -> list:
    """fn(rank, world_size, *args) on `world_size` forked ranks; returns the results by rank or raises."""
    # fork is about twice as fast, but a forked child inherits this process's torch.distributed state:
    # after an in-process run (world size 1) the ranks would think they are already initialised and hang.
    import torch.distributed as dist

    ctx = mp.get_context("spawn" if dist.is_available() and dist.is_initialized() else "fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done, errors = {}, {}
    deadline = time.monotonic() + timeout
    while len(done) + len(errors) < world_size and time.monotonic() < deadline:
        if errors:
            deadline = min(deadline, time.monotonic() + grace)
        try:
            rank, status, value = results.get(timeout=0.5)
        except queue.Empty:
            if not errors and any(p.exitcode not in (None, 0) for p in procs):
                errors[-1] = "a rank died without a traceback (exit codes "\
                             f"{[p.exitcode for p in procs]})"
            continue
        (done if status == "ok" else errors)[rank] = value
    for p in procs:
        p.join(timeout=1 if errors or len(done) < world_size else 30)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    if len(done) < world_size:
        raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(done))} did not finish within {timeout:.0f} s")
    return [done[r] for r in range(world_size)]

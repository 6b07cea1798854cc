"""Benchmark the ReLoRA restart under DeepSpeed: seconds per restart per ZeRO stage on the tiny model,
and the ZeRO-3 shard-local vs gathered merge of one 2048x5461, r=128 layer (the 1.3B model's down_proj).

    python benchmarks/restart.py                   # forks 2 gloo ranks on CPU
    torchrun --nproc_per_node 2 benchmarks/restart.py
    deepspeed --num_gpus 2 benchmarks/restart.py

Prints a table and writes benchmarks/results/restart-<host>.json (hardware, versions, config, results).
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relora_ds.dist import free_port  # noqa: E402
from relora_ds.engine import runtime, zero  # noqa: E402
from relora_ds.engine.restart import merge_into_weight, relora_restart  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402
from relora_ds.model.build import build_model  # noqa: E402
from relora_ds.relora.layer import ReLoRALinear  # noqa: E402
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import wrap  # noqa: E402

TINY_RANK, TINY_ALPHA = 16, 32
BIG_OUT, BIG_IN, BIG_RANK, BIG_ALPHA = 2048, 5461, 128, 32


def ds_config(stage: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


def train_step(engine, batch) -> None:
    loss = engine(**batch) if isinstance(batch, dict) else engine(batch)
    loss = loss.loss if hasattr(loss, "loss") else loss
    engine.backward(loss)
    engine.step()


def tiny_restarts(stage: int, bf16: bool, repeats: int, rank: int) -> dict:
    """Median seconds of a full restart (merge + re-init + magnitude prune) on the wrapped tiny model."""
    model = build_model("tiny", 256, attn_implementation="sdpa", seed=0)
    wrap(model, target_modules=target_modules_of(model), rank=TINY_RANK, alpha=TINY_ALPHA, seed=0)
    engine = runtime.make_engine(model, ds_config(stage, bf16))
    generator = torch.Generator().manual_seed(rank)
    records = []
    for index in range(1, repeats + 1):
        ids = torch.randint(0, 256, (2, 64), generator=generator)
        train_step(engine, {"input_ids": ids, "labels": ids})
        records.append(relora_restart(engine, restart_index=index, step=index, seed=0))
    engine.destroy()
    return {key: statistics.median(getattr(r, key) for r in records)
            for key in ("seconds", "merge_seconds", "prune_seconds")}


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ReLoRALinear(BIG_IN, BIG_OUT, BIG_RANK, BIG_ALPHA, kernels="torch")
        torch.nn.init.normal_(self.proj.weight, std=0.02, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.proj(x).float().square().mean()


def big_layer_merge(bf16: bool, repeats: int, rank: int) -> dict:
    """ZeRO-3 merge of one 2048x5461 layer: shard-local vs gathered (modifier rank 0); checks bitwise equality."""
    import deepspeed
    import torch.distributed as dist

    model = OneLayer()
    engine = runtime.make_engine(model, ds_config(3, bf16))
    x = torch.randn(2, BIG_IN, generator=torch.Generator().manual_seed(rank)).to(engine.device)
    train_step(engine, x.to(torch.bfloat16) if bf16 else x)
    layer = engine.module.proj
    W = layer.weight
    A, B = zero.full_tensor(engine, layer.lora_A), zero.full_tensor(engine, layer.lora_B)
    saved = W.ds_tensor.data.clone()
    times, results = {"shard": [], "gathered": []}, {}
    for _ in range(repeats):
        for mode in ("shard", "gathered"):
            dist.barrier()
            started = time.perf_counter()
            merge_into_weight(W, A, B, BIG_ALPHA / BIG_RANK, zero3_merge=mode)
            dist.barrier()
            times[mode].append(time.perf_counter() - started)
            results[mode] = W.ds_tensor.data.clone()
            W.ds_tensor.data.copy_(saved)
            zero.release_gathered(W)
    equal = torch.equal(results["shard"], results["gathered"])
    flags = torch.tensor([1.0 if equal else 0.0])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    restart = {}
    for mode in ("shard", "gathered"):
        train_step(engine, x.to(torch.bfloat16) if bf16 else x)
        record = relora_restart(engine, restart_index=len(restart) + 1, step=0, seed=0, zero3_merge=mode)
        restart[mode] = record.seconds
    with deepspeed.zero.GatheredParameters([W], modifier_rank=None):
        shape = tuple(W.shape)
    engine.destroy()
    return {"shape": shape, "rank": BIG_RANK, "bitwise_equal": bool(flags.item() == 1.0),
            "shard_merge_s": statistics.median(times["shard"]),
            "gathered_merge_s": statistics.median(times["gathered"]),
            "restart_shard_s": restart["shard"], "restart_gathered_s": restart["gathered"]}


def worker(repeats: int, output: str) -> None:
    import deepspeed
    import torch.distributed as dist

    runtime.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tiny = []
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            tiny.append({"stage": stage, "dtype": "bf16" if bf16 else "fp32",
                         **tiny_restarts(stage, bf16, repeats, rank)})
    big = [{"dtype": "bf16" if bf16 else "fp32", **big_layer_merge(bf16, repeats, rank)} for bf16 in (False, True)]
    if rank != 0:
        return
    print(f"\nReLoRA restart, tiny model (d=64, 2 layers, r={TINY_RANK}), {world} ranks, median of {repeats}")
    print(f"{'stage':>5} {'dtype':>5} {'restart s':>10} {'merge s':>9} {'prune s':>9}")
    for row in tiny:
        print(f"{row['stage']:>5} {row['dtype']:>5} {row['seconds']:>10.4f} {row['merge_seconds']:>9.4f} "
              f"{row['prune_seconds']:>9.4f}")
    print(f"\nZeRO-3 merge of one {BIG_OUT}x{BIG_IN} layer, r={BIG_RANK}, {world} ranks, median of {repeats}")
    print(f"{'dtype':>5} {'shard s':>9} {'gathered s':>11} {'speed-up':>9} {'bitwise':>8} "
          f"{'restart shard s':>16} {'restart gathered s':>19}")
    for row in big:
        print(f"{row['dtype']:>5} {row['shard_merge_s']:>9.4f} {row['gathered_merge_s']:>11.4f} "
              f"{row['gathered_merge_s'] / row['shard_merge_s']:>8.1f}x {str(row['bitwise_equal']):>8} "
              f"{row['restart_shard_s']:>16.4f} {row['restart_gathered_s']:>19.4f}")
    result = {
        "benchmark": "restart",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": {"host": socket.gethostname(), "machine": platform.machine(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                     else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "deepspeed": deepspeed.__version__},
        "config": {"world_size": world, "repeats": repeats, "tiny_rank": TINY_RANK, "tiny_alpha": TINY_ALPHA,
                   "big_layer": [BIG_OUT, BIG_IN], "big_rank": BIG_RANK, "optimizer": "torch AdamW",
                   "threads_per_rank": torch.get_num_threads()},
        "tiny": tiny,
        "zero3_big_layer": big,
    }
    atomic_write(output, json.dumps(result, indent=2))
    print(f"\nwrote {output}")


def _forked(rank: int, world: int, port: int, repeats: int, output: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    worker(repeats, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks to fork when not started by a launcher")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                         f"restart-{socket.gethostname()}.json"))
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", f"/tmp/torch_extensions_{os.getuid()}")
    if "RANK" in os.environ:  # started by torchrun / deepspeed
        worker(args.repeats, args.output)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_forked, args=(args.world_size, free_port(), args.repeats, args.output), nprocs=args.world_size,
                       start_method="fork")


if __name__ == "__main__":
    main()

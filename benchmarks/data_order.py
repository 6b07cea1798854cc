#!/usr/bin/env python
"""What choosing and reading a rank's micro-batch costs on map-style data, one source against a data.mixture.

    (a) per micro-step: rank 0's micro-batch of DistributedBatches over packed datasets on disk (memory-mapped
        uint16 rows), for a global micro-batch of 8, 512 and 4096 rows (world size × micro-batch size 8: one
        rank, 64 ranks, 512 ranks): one source, and a mixture of 3 sources (0.5 / 0.3 / 0.2), whose every rank
        runs the blend's greedy pick over the whole global micro-batch (mixture.assign)
    (b) an epoch's permutation of n rows (relora_ds.data.epoch_permutation: numpy's default_rng(...).permutation
        order held as uint32; what a single source and each mixture source build once per epoch, on every rank):
        seconds and bytes at n = 1 M, 10 M and 100 M rows (100 M rows of 2048 tokens: 205 B tokens)

The packed datasets hold random tokens (the order does not read them), written straight as token files with a
manifest. Medians of --repeats.

    python benchmarks/data_order.py                # results to benchmarks/results/<date>-data-order-cpu.{json,md}
    python benchmarks/data_order.py --quick --out /tmp/o
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relora_ds.data import epoch_permutation, loader, mixture  # noqa: E402
from relora_ds.data.pretokenize import MANIFEST_FILE  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ = 256
MB = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="packed rows per source (default 200000)")
    p.add_argument("--steps", type=int, default=200, help="micro-steps timed per case (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results; --quick: none)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.steps, args.repeats = 20_000, 20, 1
    elif args.out is None:
        args.out = os.path.join(HERE, "results")
    return args


def write_source(directory: str, rows: int, seed: int) -> str:
    """A packed dataset of `rows` random uint16 rows of SEQ tokens: one shard and its manifest."""
    os.makedirs(directory)
    tokens = np.random.default_rng(seed).integers(0, 8000, size=(rows, SEQ), dtype=np.uint16)
    tokens.tofile(os.path.join(directory, "tokens-00000.bin"))
    manifest = {"format": "relora-ds packed v2", "tokenizer": "random", "vocab_size": 8000, "vocab_hash": "0" * 16,
                "eos_id": 0, "seq_len": SEQ, "dtype": "uint16", "num_sequences": rows, "num_tokens": rows * SEQ,
                "shards": [{"file": "tokens-00000.bin", "num_sequences": rows, "bytes": tokens.nbytes}]}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    return directory


def per_step_ms(dataset, world: int, steps: int) -> float:
    """Milliseconds per micro-step of rank 0's batches (the first epoch's permutation built before timing)."""
    batches = loader.DistributedBatches(dataset, micro_batch_size=MB, rank=0, world_size=world, seed=0)
    next(batches)
    began = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return (time.perf_counter() - began) / steps * 1e3


def permutation_cost(n: int) -> tuple[float, int]:
    began = time.perf_counter()
    perm = epoch_permutation([0, 0], n)
    return time.perf_counter() - began, perm.nbytes


def main(argv=None) -> int:
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="relora-data-order-")
    paths = [write_source(os.path.join(work, f"s{i}"), args.rows, i) for i in range(3)]
    single = loader.PackedDataset(paths[0])
    mixed = mixture.MixedDataset([loader.PackedDataset(p) for p in paths], [0.5, 0.3, 0.2], ["a", "b", "c"], paths)
    worlds = (1, 64, 512) if not args.quick else (1, 64)

    steps = []
    for world in worlds:
        for name, dataset in (("one source", single), ("mixture of 3", mixed)):
            times = [per_step_ms(dataset, world, args.steps) for _ in range(args.repeats)]
            steps.append({"data": name, "world_size": world, "global_rows": world * MB,
                          "ms_per_micro_step": statistics.median(times)})
            print(f"{name:>13}  global micro-batch {world * MB:5d} rows: {steps[-1]['ms_per_micro_step']:.3f} ms",
                  flush=True)
    perms = []
    for n in ((1_000_000, 10_000_000, 100_000_000) if not args.quick else (1_000_000,)):
        seconds, nbytes = permutation_cost(n)
        perms.append({"rows": n, "seconds": seconds, "gib": nbytes / 2**30})
        print(f"permutation of {n:>11,d} rows: {seconds:.2f} s, {nbytes / 2**30:.2f} GiB", flush=True)

    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "numpy": np.__version__, "python": platform.python_version(),
              "seq_len": SEQ, "micro_batch_size": MB, "rows_per_source": args.rows, "steps": args.steps,
              "repeats": args.repeats, "command": "python benchmarks/data_order.py " + " ".join(argv or sys.argv[1:]),
              "per_step": steps, "permutation": perms}
    if args.out:
        stem = os.path.join(args.out, f"{result['date']}-data-order-cpu")
        atomic_write(stem + ".json", json.dumps(result, indent=2))
        atomic_write(stem + ".md", markdown(result))
        print(f"wrote {stem}.json and .md")
    for path in paths:
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        os.rmdir(path)
    os.rmdir(work)
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Map-style data order: one source vs a mixture ({r['date']})", "",
             f"`{r['command']}` on {r['cpus']} CPUs ({r['machine']}), numpy {r['numpy']}, Python {r['python']}; "
             f"rows of {r['seq_len']} uint16 tokens, micro-batch {r['micro_batch_size']}, {r['rows_per_source']} "
             f"rows per source, median of {r['repeats']} × {r['steps']} micro-steps.", "",
             "| data | world size | global micro-batch (rows) | ms per micro-step (rank 0) |", "|---|---|---|---|"]
    lines += [f"| {s['data']} | {s['world_size']} | {s['global_rows']} | {s['ms_per_micro_step']:.3f} |"
              for s in r["per_step"]]
    lines += ["", "| rows in the epoch | permutation: seconds | GiB (uint32) |", "|---|---|---|"]
    lines += [f"| {p['rows']:,} | {p['seconds']:.2f} | {p['gib']:.2f} |" for p in r["permutation"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

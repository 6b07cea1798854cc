#!/usr/bin/env python
"""`relora-ds plan`'s ZeRO-0/1/2 terms against what a DeepSpeed engine allocates: for ZeRO-0, 1 and 2, fp32 and bf16,
on ZeRO-1/2 a reduce bucket below and above the model's size, the bytes a rank allocates (relora_ds.memory.heap_bytes: glibc's
mallinfo2 sampled after every torch op) while the model is built and the engine made, and while it steps, beside the
plan's (`relora_ds/plan._states`: parameters, gradients, masters, moments and the step's temporaries) for the same model
and rank count. Activations are a few KiB (micro-batch 1, 4 tokens). One process, or N ranks under torchrun:

    python benchmarks/plan_terms.py                                   # one rank
    torchrun --nproc_per_node 2 benchmarks/plan_terms.py              # two gloo ranks (rank 0's bytes)
    python benchmarks/plan_terms.py --out /tmp/o                      # results directory (default benchmarks/results)
    python benchmarks/plan_terms.py --cases 0:bf16:0.25,2:fp32:8      # stage:precision:bucket/model of some cases

Writes <date>-plan-terms-<N>rank.{json,md} from rank 0. A benchmark, not a test (tests/e2e/test_plan_engine.py runs
five one-rank cases). Run it in a process of its own: glibc's mallinfo2 walks the heap, so sampling it after every op
in a long-lived process with a large, fragmented heap (a test session's) takes minutes.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relora_ds.engine import runtime  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402
from relora_ds.memory import heap_bytes  # noqa: E402
from relora_ds.model.build import build_model  # noqa: E402
from relora_ds import plan as planner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 4096
CASES = ([(0, bf16, 0.25) for bf16 in (False, True)]
         + [(stage, bf16, bucket) for stage in (1, 2) for bf16 in (False, True) for bucket in (0.25, 8.0)])


def ds_config(stage: int, bf16: bool, bucket: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket}, "bf16": {"enabled": bf16},
            "steps_per_print": 10**9}


def train(engine, steps: int) -> None:
    ids = torch.randint(0, VOCAB, (1, 4))
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def warm_up(preset: str) -> None:
    """An engine of each kind made and stepped once: the first of a process imports DeepSpeed's modules and builds
    its ops, and the first bf16 matmuls of a shape fill oneDNN's caches (MiB that are not the engine's)."""
    for stage, bf16 in ((0, False), (0, True), (1, False), (1, True), (2, False), (2, True)):
        engine = runtime.make_engine(build_model(preset, VOCAB, attn_implementation="sdpa", seed=0),
                                     ds_config(stage, bf16, 10**6))
        train(engine, 1)
        engine.destroy()


def measure(stage: int, bf16: bool, bucket_over_model: float, preset: str = "20m") -> dict:
    """This rank's allocated bytes while the model is built and the engine made (`made`) and while it takes three
    steps (`steps`), beside make_plan's build over the engine and `_states`' total for the same sizes."""
    import torch.distributed as dist

    ranks = dist.get_world_size()
    gc.collect()
    with heap_bytes() as heap:
        model = build_model(preset, VOCAB, attn_implementation="sdpa", seed=0)
        trainable = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters())
        bucket = int(bucket_over_model * trainable)
        engine = runtime.make_engine(model, ds_config(stage, bf16, bucket))
        made, heap.peak = heap.peak, 0
        train(engine, 3)
        steps = heap.peak
    engine.destroy()
    p = 2 if bf16 else 4
    c = planner.Components(runtime=0.0)
    planner._states(c, trainable, largest, p, stage, "bf16" if bf16 else "fp32", ranks, foreach=False,
                    reduce_bucket=bucket)
    # make_plan's build: the model in fp32, then the engine made over it
    engine_made = planner.engine_made(c, trainable, p, stage, "bf16" if bf16 else "fp32", ranks).total
    return {"stage": stage, "precision": "bf16" if bf16 else "fp32", "bucket_over_model": bucket_over_model,
            "ranks": ranks, "parameters": trainable, "made": made, "made_plan": max(4 * trainable, engine_made),
            "steps": steps, "steps_plan": c.total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="20m", help="model preset (default 20m)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    p.add_argument("--cases", default=None, help="comma-separated stage:precision:bucket-over-model (default: all)")
    args = p.parse_args(argv)
    cases = CASES if args.cases is None else [
        (int(stage), precision == "bf16", float(bucket))
        for stage, precision, bucket in (case.split(":") for case in args.cases.split(","))]
    runtime.init_distributed()
    import torch.distributed as dist

    warm_up(args.preset)
    rows = [measure(stage, bf16, bucket, args.preset) for stage, bf16, bucket in cases]
    if dist.get_rank() != 0:
        return 0
    ranks = rows[0]["ranks"]
    mib = 2**20
    lines = ["# `relora-ds plan`'s ZeRO-0/1/2 terms against a DeepSpeed engine's allocations", "",
             f"{datetime.date.today().isoformat()} · {platform.machine()} · {os.cpu_count()} cores · torch "
             f"{torch.__version__} · preset {args.preset} ({rows[0]['parameters'] / 1e6:.2f} M parameters, vocabulary "
             f"{VOCAB}) · {ranks} rank{'s' * (ranks > 1)}, rank 0's bytes", "",
             f"Command: `{'torchrun --nproc_per_node ' + str(ranks) if ranks > 1 else 'python'} "
             f"benchmarks/plan_terms.py`", "",
             "| stage | precision | bucket / model | made MiB | plan MiB | ratio | steps MiB | plan MiB | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['precision']} | {r['bucket_over_model']} | {r['made'] / mib:.1f} | "
                     f"{r['made_plan'] / mib:.1f} | {r['made_plan'] / r['made']:.2f} | {r['steps'] / mib:.1f} | "
                     f"{r['steps_plan'] / mib:.1f} | {r['steps_plan'] / r['steps']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-plan-terms-{ranks}rank")
    atomic_write(stem + ".json", json.dumps(rows, indent=1))
    atomic_write(stem + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

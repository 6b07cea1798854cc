"""Where a ZeRO-3 CPU rank's memory goes: RSS after each stage of two training steps of a preset, per rank.

    python benchmarks/zero3_memory.py --preset 350m --ranks 2 \
        --zero '{"reduce_bucket_size": 2e7, "sub_group_size": 2e7}' [--heap-threshold]

Builds the model partitioned (relora_ds.model.build.build_model with the ZeRO-3 config), makes the engine, runs
two forward/backward/step cycles on random tokens, and prints each rank's current RSS and the peak since the
previous line (relora_ds/memory.py). `--zero` adds zero_optimization knobs to a plain fp32 ZeRO-3 config;
`--heap-threshold` applies memory.fix_heap_threshold (what the trainer does on CPU ZeRO-3 runs) before the
build. A diagnostic for benchmarks/README.md ("Scale"), not a test.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(rank, world_size, preset, vocab_size, seq_len, zero, heap_threshold):
    import torch

    from relora_ds.engine import runtime
    from relora_ds.memory import (GIB, current_rss, fix_heap_threshold, release_memory, reset_rss_high_water_mark,
                                  rss_high_water_mark)
    from relora_ds.model.build import build_model

    if heap_threshold:
        fix_heap_threshold()
    lines = []

    def mark(what):
        lines.append(f"rank {rank} {what:12s} rss {current_rss() / GIB:6.2f} GiB  peak {rss_high_water_mark() / GIB:6.2f}")
        reset_rss_high_water_mark()

    reset_rss_high_water_mark()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 3, **zero}, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    model = build_model(preset, vocab_size, attn_implementation="sdpa", seed=0, zero3_config=config)
    release_memory()
    mark("build")
    engine = runtime.make_engine(model, config)
    release_memory()
    mark("engine")
    ids = torch.randint(0, vocab_size, (1, seq_len))
    for i in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        mark(f"forward {i}")
        engine.backward(loss)
        mark(f"backward {i}")
        engine.step()
        mark(f"step {i}")
        del loss
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", default="{}", help="JSON object of zero_optimization knobs")
    p.add_argument("--heap-threshold", action="store_true", help="memory.fix_heap_threshold() first")
    args = p.parse_args(argv)
    from tests.helpers.spawn import run_on_ranks

    zero = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in json.loads(args.zero).items()}
    results = run_on_ranks(measure, world_size=args.ranks, timeout=1800,
                           args=(args.preset, args.vocab_size, args.seq_len, zero, args.heap_threshold))
    for lines in zip(*results):
        print("   |   ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

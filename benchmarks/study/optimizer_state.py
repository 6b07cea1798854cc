#!/usr/bin/env python
"""One rank's optimizer-state bytes of each method of the study, measured: a 2-step run of each on the study's base
config (the state is allocated whole by the first step and keeps its size: Adam's moments of every trained tensor,
GaLore's moments of each projected matrix and its projection), summary["optimizer_state_bytes"].

    python benchmarks/study/optimizer_state.py --config benchmarks/study/20m-sotu.yaml --data runs/study-galore/data \
        --out runs/study-galore/optimizer_state.json

lora_warm and relora after their switch train the same tensors as an adapter run from step 0, which is what is run.
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from relora_ds import trainer  # noqa: E402
from relora_ds.config import load_config  # noqa: E402

# variant → (method, what differs from the base for a 2-step run of its low-rank phase)
VARIANTS = {"full": "full", "lora_warm": "lora", "relora": "relora", "galore": "galore"}


def measure(config: str, data: str, variant: str, directory: str) -> int:
    cfg = load_config(config, [f"method={VARIANTS[variant]}", "relora.warm_start_steps=0", "train.total_steps=2",
                               "schedule.warmup_steps=1", "schedule.restart_warmup_steps=1", "relora.reset_every=2",
                               "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
                               f"data.source={data}/train.jsonl", f"data.validation_source={data}/heldout.jsonl",
                               f"train.output_dir={directory}/{variant}"])
    return trainer.train(cfg)["optimizer_state_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="the held-out split's directory (heldout_split.py)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        found = {variant: measure(args.config, args.data, variant, directory) for variant in VARIANTS}
    with open(args.out, "w") as f:
        json.dump(found, f, indent=1)
    for variant, size in found.items():
        print(f"{variant:10s} {size / 2**20:8.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An in-distribution held-out split of the shipped SOTU training split, for method comparisons.

SOTU's own validation split is a later era than its training split, so a method's held-out perplexity there mixes
how well it learned with how well it extrapolates across decades. This holds out every tenth speech of the training
split instead (21 of 211, spread over all eras) and trains on the other 190:

    python benchmarks/study/heldout_split.py OUT_DIR     # OUT_DIR/train.jsonl, OUT_DIR/heldout.jsonl

Deterministic: the same files on every machine.
"""

import gzip
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "relora_ds", "data", "sample", "sotu", "train.jsonl.gz")
EVERY = 10  # speech i is held out when i % EVERY == EVERY - 1


def split(out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "heldout.jsonl")
    with gzip.open(SOURCE, "rt") as src, open(paths[0], "w") as train, open(paths[1], "w") as heldout:
        for i, line in enumerate(src):
            (heldout if i % EVERY == EVERY - 1 else train).write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for path in split(sys.argv[1]):
        with open(path) as f:
            print(f"{path}: {sum(1 for _ in f)} speeches")

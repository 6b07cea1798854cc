"""Throughput, MFU and memory of ReLoRA against full-rank training: `relora-ds bench`, run from the checkout.

    python benchmarks/throughput.py --preset 1b --seq-len 2048 --micro-batch 4 --repeats 3 --profile

The benchmark lives in the package (relora_ds/bench/: throughput.py the parent, worker.py one mode per
process, report.py the table); this script only makes the checkout importable and writes the results into
the checkout's benchmarks/results/ unless --results-dir says otherwise. See benchmarks/README.md.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout first (relora_ds importable from any working directory).
sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.join(REPO, "benchmarks")]

from relora_ds.bench import throughput  # noqa: E402

if __name__ == "__main__":
    throughput.DEFAULT_RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
    sys.exit(throughput.main(prog="benchmarks/throughput.py"))

"""relora-ds plan's ZeRO-0/1/2 terms against a DeepSpeed engine's own memory: the bytes a real engine (one process)
allocates while the model is built and the engine made, and while it steps, beside the plan's parameters, gradients,
masters, moments and temporaries of the same model (benchmarks/plan_terms.py, run in a process of its own: it samples
glibc's allocation counters after every op, which the test session's large heap would make slow). ZeRO-0 bf16
(BF16_Optimizer) makes Adam's moments with the engine. The ZeRO-1/2 reduction bucket is set below and above the
model's size, so that either the backward (the bucket, allocated whole) or the optimizer step (the fp32 gradient
partition, AdamW over the flat partition) holds the peak. (Two ranks: `torchrun --nproc_per_node 2
benchmarks/plan_terms.py`; the rehearsals' sizes: benchmarks/plan_check.py.)"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import cpu_env

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = "0:bf16:0.25,1:fp32:8,1:bf16:0.25,2:fp32:0.25,2:bf16:8"


def test_the_plan_holds_what_deepspeed_allocates(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plan_terms.py"), "--cases", CASES,
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=cpu_env())
    assert result.returncode == 0, result.stderr[-2000:]
    [path] = glob.glob(str(tmp_path / "*-plan-terms-1rank.json"))
    rows = json.load(open(path))
    assert [(r["stage"], r["precision"], r["bucket_over_model"]) for r in rows] == [
        (0, "bf16", 0.25), (1, "fp32", 8.0), (1, "bf16", 0.25), (2, "fp32", 0.25), (2, "bf16", 8.0)]
    for r in rows:
        assert r["steps"] == pytest.approx(r["steps_plan"], rel=0.03), r
        assert r["made"] == pytest.approx(r["made_plan"], rel=0.03), r

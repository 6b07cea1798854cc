"""relora-ds plan's ZeRO-0/1/2 terms against a DeepSpeed engine's own memory: the bytes a real engine (one process)
allocates while the model is built and the engine made, and while it steps, beside the plan's parameters, gradients,
masters, moments and temporaries of the same model (benchmarks/plan_terms.measure); ZeRO-0 bf16 (BF16_Optimizer)
makes Adam's moments with the engine. The ZeRO-1/2 reduction bucket is set below and above the model's size, so that either the backward (the bucket, allocated whole) or the optimizer step (the fp32
gradient partition, AdamW over the flat partition) holds the peak. (Two ranks: `torchrun --nproc_per_node 2
benchmarks/plan_terms.py`; the rehearsals' sizes: benchmarks/plan_check.py.)"""

import importlib.util
import os

import pytest

from relora_ds.engine import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def plan_terms():
    spec = importlib.util.spec_from_file_location("plan_terms", os.path.join(ROOT, "benchmarks", "plan_terms.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runtime.init_distributed()
    module.warm_up("20m")
    return module


@pytest.mark.parametrize("stage,bf16,bucket_over_model", [(0, True, 0.25), (1, False, 8.0), (1, True, 0.25),
                                                          (2, False, 0.25), (2, True, 8.0)])
def test_the_plan_holds_what_deepspeed_allocates(plan_terms, stage, bf16, bucket_over_model):
    row = plan_terms.measure(stage, bf16, bucket_over_model)
    assert row["steps"] == pytest.approx(row["steps_plan"], rel=0.03)
    assert row["made"] == pytest.approx(row["made_plan"], rel=0.03)

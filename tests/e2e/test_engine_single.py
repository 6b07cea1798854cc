"""engine.runtime.make_engine in one process: ZeRO-0 skips DeepSpeed's gradient all-reduce (an exact no-op
with one rank), and training is bitwise the same as with it."""

import pytest
import torch

from relora_ds.engine import ds_config as dsc, runtime
from tests.helpers.tiny import fixed_batch, tiny_model


@pytest.fixture(scope="module")
def single_process():
    import torch.distributed as dist

    runtime.init_distributed()  # a free port: MASTER_PORT unset, world size 1
    assert dist.get_world_size() == 1


def train(engine, steps: int = 4) -> list[float]:
    losses = []
    for step in range(steps):
        ids = fixed_batch(4, 32, seed=step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["cpu.json", "cpu_zero1.json"])
def test_zero0_single_process_skips_the_allreduce_with_the_same_result(single_process, name):
    config = dsc.reconcile(dsc.load_ds_config(f"ds_configs/{name}"), lr=1e-3, world_size=1)
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = 4, 1
    config.pop("train_batch_size", None)
    runs = {}
    for allreduce in (False, True):
        engine = runtime.make_engine(tiny_model(seed=0), config)
        assert engine.enable_backward_allreduce == (dsc.zero_stage(config) != 0)
        engine.enable_backward_allreduce = engine.enable_backward_allreduce or allreduce
        runs[allreduce] = (train(engine), [p.detach().clone() for p in engine.module.parameters()])
        engine.destroy()
    assert runs[False][0] == runs[True][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1]))

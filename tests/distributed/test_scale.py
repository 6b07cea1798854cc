"""Scale invariants on 2 gloo ranks (one spawn): a model built partitioned under ZeRO-3 (preset and init_from)
equals the unsharded build, and the warm-start switch on every stage frees the full-rank optimizer, keeps the
loss, allocates far less than a model copy, and trains on."""

import gc
import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.runs import ds_config
from tests.helpers.tiny import fixed_batch

pytestmark = pytest.mark.slow

VOCAB = 256


def small_buckets_config(stage: int) -> dict:
    # Buckets of DeepSpeed's default sizes (5e8 elements) would dwarf a small model in the byte count.
    buckets = {"reduce_bucket_size": 10**5, "allgather_bucket_size": 10**5,
               **({"stage3_prefetch_bucket_size": 10**5} if stage == 3 else {})}
    return ds_config(stage, adamw={"lr": 1e-3, "torch_adam": True}, zero=buckets)


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the new storages that torch ops create while active (views and in-place results not counted)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        seen = set()
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in seen:
                    seen.add(ptr)
                    self.bytes += t.untyped_storage().nbytes()
        return out


def gathered_state(model) -> dict:
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


def scenario(rank, world_size, directory):
    from relora_ds.methods.lora import ReLoRAConfig
    from relora_ds.model.build import build_model, model_from_config
    from relora_ds.config import ModelConfig
    from relora_ds.engine.train_module import TrainEngine

    out = {}
    # 1. Sharded construction: partitioned from the start, and the same weights as the unsharded build.
    plain = build_model("tiny", VOCAB, attn_implementation="sdpa", seed=3)
    sharded = build_model("tiny", VOCAB, attn_implementation="sdpa", seed=3, zero3_config=small_buckets_config(3))
    out["partitioned"] = all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in sharded.parameters())
    full = gathered_state(sharded)
    out["same_init"] = {n: torch.equal(p, full[n]) for n, p in plain.named_parameters()}
    # init_from a saved HF model dir, loaded partition by partition.
    saved = os.path.join(directory, "hf")
    if rank == 0:
        plain.save_pretrained(saved)
    torch.distributed.barrier()
    loaded = model_from_config(ModelConfig(init_from=saved, attn_implementation="sdpa"), VOCAB,
                               zero3_config=small_buckets_config(3))
    out["init_from_partitioned"] = all(p.numel() == 0 for p in loaded.parameters())
    loaded_full = gathered_state(loaded)
    out["init_from_same"] = all(torch.equal(p.float(), loaded_full[n].float()) for n, p in plain.named_parameters())
    del sharded, loaded

    # 2. The warm-start switch on every stage.
    relora_cfg = ReLoRAConfig(rank=4, alpha=8, kernels="torch")
    ids = fixed_batch(2, 32, seed=rank)
    out["switch"] = {}
    for stage in (0, 1, 2, 3):
        zero3 = small_buckets_config(3) if stage == 3 else None
        model = build_model("20m", VOCAB, attn_implementation="sdpa", seed=0, zero3_config=zero3)
        model_bytes = sum(4 * (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in model.parameters())
        train_engine = TrainEngine(relora_with(relora_cfg), small_buckets_config(stage))
        train_engine.build(model)  # full rank: nothing is wrapped yet
        engine = train_engine.ds
        for _ in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        del loss  # its backward hooks hold the engine (the trainer's step keeps none either)
        engine.eval()
        with torch.no_grad():
            before = engine(input_ids=ids, labels=ids).loss.item()
        old_optimizer = weakref.ref(engine.optimizer)
        counter = AllocatedBytes()
        with counter:
            engine = None
            train_engine.remake(train_engine.method.wrap)  # the warm-start switch
            engine = train_engine.ds
        gc.collect()
        engine.eval()
        with torch.no_grad():
            after = engine(input_ids=ids, labels=ids).loss.item()
        engine.train()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out["switch"][stage] = {"old_optimizer_freed": old_optimizer() is None, "before": before, "after": after,
                                "allocated": counter.bytes, "model_bytes": model_bytes,
                                "trained_on": bool(torch.isfinite(loss).item())}
        engine.destroy()
        del engine, model
        gc.collect()
    return out


def relora_with(relora_cfg):
    """The ReLoRA method of a run config holding only what it reads."""
    from relora_ds.config import RunConfig
    from relora_ds.methods.relora import ReLoRA

    cfg = RunConfig()
    cfg.relora = relora_cfg
    cfg.train.seed = 0
    return ReLoRA(cfg.resolved())


def test_sharded_build_and_memory_bounded_switch(tmp_path):
    from tests.helpers.spawn import run_on_ranks

    results = run_on_ranks(scenario, world_size=2, args=(str(tmp_path),), timeout=400)
    for out in results:
        assert out["partitioned"] and out["init_from_partitioned"]
        assert all(out["same_init"].values()), [n for n, same in out["same_init"].items() if not same]
        assert out["init_from_same"]
        for stage, s in out["switch"].items():
            assert s["old_optimizer_freed"], f"stage {stage}: the full-rank optimizer outlived the switch"
            assert s["after"] == pytest.approx(s["before"], rel=1e-6, abs=1e-6), stage
            # The old switch gathered a full fp32 copy and built a second model: >= 2x the model.
            assert s["allocated"] < 0.35 * s["model_bytes"], (stage, s["allocated"], s["model_bytes"])
            assert s["trained_on"], stage


def nan_on_one_rank(rank, world_size, directory):
    """A loss that is NaN on rank 1 only, at step 3: both ranks must stop in that step with the same message; with
    train.nonfinite_rewinds both go back to the checkpoint of step 2 together and finish the run."""
    from relora_ds import trainer
    from relora_ds.engine import checkpoint, train_module
    from relora_ds.errors import NonFiniteError
    from tests.helpers.runs import tiny_run_config

    calls = {"n": 0}
    move = train_module._move

    def poisoned(batch, device):
        calls["n"] += 1
        batch = move(batch, device)
        if rank == 1 and calls["n"] == 3:  # every label ignored: the mean loss over no tokens is NaN
            batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch

    train_module._move = poisoned
    cfg = tiny_run_config(directory, os.path.join(directory, "train.jsonl"), os.path.join(directory, "val.jsonl"),
                          os.path.join(directory, "ds_stage2.json"),
                          **{"train.eval_every": 0, "checkpoint.every": 2, "train.total_steps": 8})
    try:
        trainer.train(cfg)
    except NonFiniteError as e:
        tags = checkpoint.complete_tags(os.path.join(cfg.train.output_dir, "checkpoints"))
        result = {"message": str(e), "tags": tags}
    else:
        return {"message": None}
    calls["n"] = 0  # the same failure in a run that may rewind once
    cfg.train.output_dir, cfg.train.nonfinite_rewinds = os.path.join(directory, "rewound"), 1
    summary = trainer.train_rewinding(cfg)
    return {**result, "rewound": (summary["step"], sorted(summary["losses"]))}


def test_nan_on_one_rank_stops_every_rank_in_that_step_or_rewinds_them_together(tmp_path):
    from tests.helpers.runs import write_corpus, write_ds_config
    from tests.helpers.spawn import run_on_ranks

    train_file, val_file = write_corpus(tmp_path)
    os.replace(val_file, tmp_path / "val.jsonl")
    write_ds_config(tmp_path, stage=2)
    results = run_on_ranks(nan_on_one_rank, world_size=2, args=(str(tmp_path),), timeout=240)
    messages = {r["message"] for r in results}
    assert len(messages) == 1 and None not in messages, messages
    message = messages.pop()
    assert message.startswith("training stopped at step 3: the loss is not finite on rank(s) 1;"), message
    assert results[0]["tags"] == ["step_00000002"]  # the last complete checkpoint is kept, nothing after it
    assert [r["rewound"] for r in results] == [(8, list(range(3, 9)))] * 2  # both went back to step 2 and finished

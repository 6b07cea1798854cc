"""Small real training runs for tests: a slice of the shipped corpus, the DeepSpeed config of CPU runs, tiny run
configs, and the environment of a child process on DeepSpeed's CPU accelerator."""

import gzip
import json
import os

from relora_ds.config import load_config
from tests.helpers import ROOT

SOTU = os.path.join(ROOT, "relora_ds", "data", "sample", "sotu")


def write_corpus(directory, n_train: int = 12, n_val: int = 3) -> tuple[str, str]:
    """First documents of the shipped SOTU splits as small jsonl files (fast to tokenize)."""
    paths = []
    for split, n in (("train", n_train), ("validation", n_val)):
        path = os.path.join(str(directory), f"{split}.jsonl")
        with gzip.open(os.path.join(SOTU, f"{split}.jsonl.gz"), "rt") as src, open(path, "w") as dst:
            for _, line in zip(range(n), src):
                dst.write(json.dumps({"text": json.loads(line)["text"][:20000]}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def ds_config(stage: int = 0, micro_batch: int = 2, bf16: bool = False, *, adamw: dict | None = None,
              zero: dict | None = None, **extra) -> dict:
    """The DeepSpeed config of the tests' CPU runs: torch's AdamW (`adamw`: its params, default betas 0.9/0.95 and
    no weight decay, the LR left to the trainer), ZeRO `stage` (plus the `zero` keys), gradients clipped at 1.0, no
    step prints; `extra` adds or replaces top-level keys."""
    params = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True} if adamw is None else adamw
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": {"stage": stage, **(zero or {})},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        **extra,
    }


def write_ds_config(directory, stage: int = 0, micro_batch: int = 2, bf16: bool = False, **extra) -> str:
    """`ds_config(stage, micro_batch, bf16, **extra)` written to DIR/ds_stage<stage>[_bf16].json; returns the path."""
    path = os.path.join(str(directory), f"ds_stage{stage}{'_bf16' if bf16 else ''}.json")
    with open(path, "w") as f:
        json.dump(ds_config(stage, micro_batch, bf16, **extra), f)
    return path


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def cpu_env(**extra) -> dict:
    """This process's environment for a child process that runs DeepSpeed on the CPU (DS_ACCELERATOR=cpu), plus
    `extra`; without this process's torch.distributed rendezvous (a training run in this process set MASTER_PORT to
    the port its own store holds, and a child given it fails to bind it)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return {**env, "DS_ACCELERATOR": "cpu", **extra}


def tiny_run_config(directory, train_file, val_file, ds_config, **fields):
    """A tiny relora run: warm start 4, restarts every 4, 16 steps, log and eval often. `fields`: dotted."""
    overrides = {
        "model.preset": "tiny", "relora.rank": 4, "relora.alpha": 8, "relora.warm_start_steps": 4,
        "relora.reset_every": 4, "schedule.lr": 3e-3, "schedule.warmup_steps": 2,
        "schedule.restart_warmup_steps": 1, "data.source": train_file, "data.validation_source": val_file,
        "data.seq_len": 32, "train.total_steps": 16, "train.eval_every": 8, "train.eval_batches": 2,
        "train.deepspeed_config": ds_config, "train.output_dir": os.path.join(str(directory), "run"),
        "log.every": 1, "log.progress": False, "checkpoint.every": 0, "checkpoint.keep_last": 0,
        "relora.kernels": "torch",
    }
    overrides.update(fields)
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def short_run_config(directory, train_file, val_file, ds_config, family: str = "llama", **fields):
    """A six-step tiny relora run of a model family: full rank to 2, the switch at 2, a restart at 4; eval at 0 and
    6; the final checkpoint at 6."""
    return tiny_run_config(directory, train_file, val_file, ds_config, **{
        "model.family": family, "relora.warm_start_steps": 2, "relora.reset_every": 2, "train.total_steps": 6,
        "train.eval_every": 6, **fields})


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]

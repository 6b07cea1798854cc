"""The training loop: `train(cfg)` sets a run up, then steps through it, calling its callbacks.

The loop reads top to bottom (`train`, below). What happens around the steps is callbacks (relora_ds/callbacks/:
evaluation, checkpoints, memory events, step logging, plots; the training method adds its own: the warm-start switch,
ReLoRA's restarts), each with the named hooks of callbacks/base.py and its own state for resume. The model under
DeepSpeed is one object, the TrainEngine (relora_ds/engine/train_module.py); the loop sees neither DeepSpeed nor a
restart layout, and holds no method names.
"""

import copy
import json
import os
import sys
from dataclasses import dataclass, field

import torch

from relora_ds import dist, hardware, methods
from relora_ds.callbacks.base import StepResult
from relora_ds.callbacks.checkpointing import Checkpointing
from relora_ds.callbacks.data_skip import DataSkip
from relora_ds.callbacks.evaluation import Evaluation
from relora_ds.callbacks.logging import StepLogging
from relora_ds.callbacks.memory import MemoryEvents
from relora_ds.callbacks.plots import LossPlot
from relora_ds.data import loader as data_loader, mixture, skip
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine import checkpoint, ds_config as dsc, run_dir, runtime
from relora_ds.engine.train_module import mean_over_ranks, optimizer_bytes, over_ranks, start_engine
from relora_ds.errors import NonFiniteError, RunError
from relora_ds.fields import setting
from relora_ds.files import atomic_write
from relora_ds.memory import GIB, PhaseMemory, fix_heap_threshold, returns_freed_host_memory
from relora_ds.metrics import Metrics
from relora_ds.model.build import CHECKPOINTING, describe, enable_activation_checkpointing, meta_model
from relora_ds.model.counts import flops_per_token, parameter_counts
from relora_ds.plan import make_plan, rank_device_bytes
from relora_ds.stop import StopSignals, check_finished, signal_name


RESUME_CHOICES = (False, True, "auto")  # train.resume


@dataclass
class TrainConfig:
    total_steps: int = setting(1000, "optimizer steps N, warm start included")
    seed: int = setting(42, "seed for init, data order and adapter draws")
    eval_every: int = setting(200, "steps between held-out evaluations; 0: never")
    eval_batches: int = setting(20, "micro-batches per evaluation")
    deepspeed_config: str = setting("ds_configs/cpu.json", "DeepSpeed JSON: batch sizes, precision, ZeRO, optimizer")
    output_dir: str = setting("runs/default", "run directory")
    resume: bool | str = setting(
        False, "false: refuse an output_dir holding another run; true: continue from its newest complete checkpoint "
               "(error if none); auto: continue if there is one, else start fresh (for requeued jobs)", RESUME_CHOICES)
    max_grad_norm: float | None = setting(None, "gradient clipping; null: the DeepSpeed JSON's gradient_clipping")
    activation_checkpointing: str = setting(
        "none", "full: recompute each decoder layer's activations in the backward pass instead of keeping them "
                "(less memory, about one more forward of compute); selective: recompute only each layer's MLP; none: "
                "keep them", CHECKPOINTING)
    nonfinite_rewinds: int = setting(
        0, "on a non-finite loss or gradient norm, go back to the newest checkpoint and pass over the data from it to "
           "the failed step (a data.skip entry), at most this many times in one command; 0: stop with the error")


@dataclass
class TrainState:
    """The loop's own progress, besides weights and optimizer; identical on every rank."""

    step: int = 0                  # optimizer steps done
    tokens_seen: int = 0
    data: dict = field(default_factory=dict)


class Trainer:
    """What the loop and its callbacks share: the config, the method, the engine, the data, the logs, the state."""

    def __init__(self, cfg, method, engine, batches, metrics, callbacks, *, tokens_per_step: int,
                 train_tokens: int | None):
        self.cfg, self.method, self.engine, self.batches = cfg, method, engine, batches
        self.metrics, self.callbacks, self.state = metrics, callbacks, TrainState()
        self.tokens_per_step = tokens_per_step
        self.train_tokens = train_tokens  # tokens in one epoch of the training data (None: a stream)
        self.summary = {"evals": [], "losses": {}, "grad_norms": {}, "restarts": []}
        self.stop = StopSignals([])  # this rank's stop signals (train() hands its own)
        self.signalled = 0  # the largest stop signal the ranks have agreed on (0: none): the loop ends before a step

    def fire(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def event(self, name: str, action) -> None:
        """Run `action` (a switch, restart, evaluation, checkpoint) between steps; every callback hears of it,
        before and after, with the fields the action returned."""
        self.fire("before_event", name)
        self.fire("on_event", name, action() or {})

    def state_dict(self) -> dict:
        """The run state saved with a checkpoint (JSON): the loop's, the method's, each callback's, the config."""
        self.state.data = self.batches.state_dict()
        return {**self.state.__dict__, "method": self.method.state_dict(),
                "callbacks": {c.name: c.state_dict() for c in self.callbacks}, "config": self.cfg.to_dict()}

    def load_state_dict(self, saved: dict, *, resume: bool = True) -> None:
        """Carry on from a checkpoint's run state: the step, tokens and data position always; the method's and the
        callbacks' state when it is this run's own (resume), not a full-rank warm start's."""
        self.state = TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"], data=saved["data"])
        self.batches.load_state_dict(self.state.data)
        if resume:
            self.method.load_state_dict(saved.get("method", saved))  # checkpoints before "method": flat keys
            for c in self.callbacks:
                c.load_state_dict(saved.get("callbacks", {}).get(c.name, {}))


def train(cfg, *, keep_engine: bool = False, stop: StopSignals | None = None) -> dict:
    """Run training as configured; returns a summary (final step, losses, eval results, paths, total_params and
    trainable_params of the final model; "stopped": the stop signal's name when one ended the run early, else None).

    stop: the StopSignals (entered) whose signals end the run early at a checkpoint; the commands that train pass one
    (checkpoint.stop_signals), a caller from Python may: without it the process's signals keep their own handling.
    The engine is destroyed before returning (its memory freed); keep_engine: it is returned as summary["engine"]
    instead, live (its DeepSpeed engine; the caller destroys it: tests that look at the trained model)."""
    trainer = setup(cfg)
    if stop is not None:  # else the trainer's own, with no signals: `received` stays 0
        trainer.stop = stop
    total_steps = trainer.cfg.train.total_steps
    batches = iter(trainer.batches)
    try:
        trainer.fire("on_start")
        # a signal in setup: stop before any step; one the ranks agree on during an event (an evaluation) or a step
        # (its all-reduce carries it): before the next step
        trainer.signalled = int(max(over_ranks(trainer.stop.received, trainer.engine.device)))
        while trainer.state.step < total_steps and not trainer.signalled:
            trainer.fire("pre_step")  # evaluation at step 0, the reference checkpoint, the switch and restarts
            if trainer.signalled:
                break
            step = trainer.state.step
            lr = trainer.cfg.schedule.lr * trainer.method.lr_multiplier(step)
            logs = (step + 1) % trainer.cfg.log.every == 0 or step + 1 == total_steps
            loss, grad_norm, trainer.signalled = trainer.engine.step(
                batches, lr=lr, step=step + 1, grad_norm=logs, stop_signal=trainer.stop.received)
            trainer.state.step += 1
            trainer.state.tokens_seen += trainer.tokens_per_step
            trainer.fire("post_step", StepResult(loss, grad_norm, lr, logs))  # logging, evaluation, checkpoints
    except NonFiniteError:  # the same step on every rank: free the run, so that a rewind can build it again
        trainer.batches.close()
        trainer.metrics.close()
        trainer.engine.destroy()
        raise
    stopped = signal_name(trainer.signalled) if trainer.state.step < total_steps else None
    if stopped:
        trainer.metrics.log_event("stop", trainer.state.step, signal=stopped)
        trainer.fire("on_stop")  # the checkpoint to resume from
    else:
        trainer.fire("on_end")
    return finish(trainer, keep_engine, stopped=stopped)


def train_command(cfg, then: str) -> dict:
    """`train` as the commands that train run it (relora_ds.train, compare, demo): the signals of
    checkpoint.stop_signals end the run at a checkpoint, which then raises stop.Stopped (one line, exit code 75;
    `then`: how to go on). Returns the summary of a run that was not stopped."""
    with StopSignals(cfg.checkpoint.stop_signals) as stop:
        summary = train_rewinding(cfg, stop)
    check_finished(summary, cfg.train.total_steps, then)
    return summary


def train_rewinding(cfg, stop: StopSignals | None = None) -> dict:
    """`train`, going back after a non-finite loss or gradient norm at most train.nonfinite_rewinds times: to the
    newest checkpoint, passing over the data from it to the failed step (`rewound`); then the NonFiniteError."""
    for rewind in range(cfg.train.nonfinite_rewinds + 1):
        try:
            return train(cfg, stop=stop)
        except NonFiniteError as e:
            if rewind == cfg.train.nonfinite_rewinds:
                raise
            cfg = rewound(cfg, e, rewind + 1)


def rewound(cfg, error: NonFiniteError, rewind: int):
    """The config that resumes the run from its newest checkpoint (step c) and, after step c, passes over the data
    of every step the failed run trained on from there, the failed step included, and what data.skip passed over in
    between (`error`: a NonFiniteError at step k); the error itself when there is no checkpoint to go back to."""
    newest = run_dir.newest_checkpoint(cfg.train.output_dir)
    if newest is None:
        raise error
    start = checkpoint.read_state(newest)["step"]
    skips = skip.parse(cfg.data.skip)
    steps = skips.pop(start, 0) + (error.step - start) + sum(n for s, n in skips.items() if start < s < error.step)
    skips[start] = steps
    if dist.is_rank_zero():
        print(f"{error}\nrewind {rewind} of {cfg.train.nonfinite_rewinds} (train.nonfinite_rewinds): back to the "
              f"checkpoint of step {start}, passing over the data of {steps} steps after it "
              f"(data.skip {start}:{steps})", flush=True)
    cfg = copy.deepcopy(cfg)
    cfg.data.skip = [f"{s}:{n}" for s, n in sorted(skips.items())]
    cfg.train.resume = True
    return cfg


# --- setting a run up and closing it ------------------------------------------------------------------------

def setup(cfg) -> Trainer:
    """Everything the loop needs: the output directory, the DeepSpeed config and where to start (engine/run_dir.py),
    the method, data and tokenizer, the engine (fresh, resumed, or from a warm-start checkpoint), the metrics
    sinks and the callbacks, in that order; what would fail later fails here, with one line."""
    cfg = cfg.resolved()
    runtime.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    resume_tag = run_dir.prepare_output_dir(cfg)
    dist.barrier()
    ds_config = dsc.reconcile(dsc.load_ds_config(cfg.train.deepspeed_config), lr=cfg.schedule.lr,
                              world_size=world, max_grad_norm=cfg.train.max_grad_norm,
                              source=cfg.train.deepspeed_config)
    start = run_dir.find_start(cfg, resume_tag, dsc.zero_stage(ds_config))
    try:
        method = methods.from_config(cfg)
        if start.saved is not None and not start.resume:
            method.adopt_warm_start(start.saved["step"])
    except ValueError as e:
        raise RunError(str(e)) from None
    out = cfg.train.output_dir

    micro_bs, grad_accum = dsc.micro_batch_size(ds_config), dsc.grad_accum_steps(ds_config)
    if returns_freed_host_memory(dsc.zero_stage(ds_config), method.stores_weight, torch.cuda.is_available()):
        fix_heap_threshold()  # host RSS of ZeRO-3's gather/free churn or a stored W's dequantized copies (memory.py)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if len(tokenizer) > vocab_size:
        raise RunError(f"model.vocab_size {vocab_size} is smaller than the tokenizer's vocabulary "
                       f"({len(tokenizer)} tokens, data.tokenizer); raise it or leave it unset")
    check_model_settings(cfg, method, vocab_size, ds_config)  # before any rank reads data or builds anything
    device = runtime.device()
    plan = make_plan(cfg, ds_config, world, vocab_size, accelerator=device.type)
    capacity = rank_device_bytes(device)
    if rank == 0 and capacity is not None and plan.peak > capacity:
        worst = max(plan.phases, key=lambda name: plan.phases[name].total)
        print(f"warning: relora-ds plan puts this run's peak at {plan.peak / GIB:.2f} GiB per rank ({worst}), more "
              f"than the {capacity / GIB:.2f} GiB a rank has here; `relora-ds plan --config ... --device-memory "
              f"{capacity / GIB:.0f}GiB` names the cheapest change that fits", file=sys.stderr, flush=True)
    cache_dir = os.path.join(out, "cache")
    train_set = data_loader.dataset_from_config(cfg.data, tokenizer, split="train", cache_dir=cache_dir)
    # Tokens in one epoch of the training data: known for map-style (packed) data, not for a stream.
    train_tokens = train_set.num_tokens if isinstance(train_set, data_loader.PackedDataset) else None
    val_set = data_loader.dataset_from_config(cfg.data, tokenizer, split="validation", cache_dir=cache_dir)
    batches = data_loader.DistributedBatches(train_set, micro_batch_size=micro_bs, rank=rank, world_size=world,
                                             seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                             prefetch_batches=cfg.data.prefetch_batches)
    eval_sets = data_loader.held_out_sets(val_set, micro_batch_size=micro_bs, max_batches=cfg.train.eval_batches,
                                          rank=rank, world_size=world)

    phases = PhaseMemory(device)
    def prepare_model(model) -> None:
        check_seq_len(cfg, model.config.max_position_embeddings)
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing)

    engine = start_engine(cfg.model, method, ds_config, vocab_size=vocab_size, seed=cfg.train.seed, start=start,
                          prepare_model=prepare_model)
    build_peak = phases.end("build")

    if rank == 0:
        os.makedirs(out, exist_ok=True)
        cfg.save(os.path.join(out, "config.yaml"))
        atomic_write(os.path.join(out, "ds_config.json"), json.dumps(ds_config, indent=2))
    metrics = Metrics(out, total_steps=cfg.train.total_steps, rank=rank, every=cfg.log.every,
                      progress=cfg.log.progress, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                      wandb_entity=cfg.log.wandb_entity, run_name=cfg.log.run_name, tags=cfg.log.tags,
                      tensorboard=cfg.log.tensorboard, config=cfg.to_dict())
    tokens_per_step = micro_bs * grad_accum * world * cfg.data.seq_len
    model_flops = flops_per_token_full(cfg, engine.module)  # wrapped or not: the same linears, counted as built
    peak_flops = peak_flops_per_device(cfg, ds_config, engine.device)
    mfu_per_tokens_per_s = model_flops / peak_flops / world if model_flops and peak_flops else None
    sources = mixture.described(train_set)
    if sources is not None:
        engine.track_sources(len(sources))
    callbacks = [StepLogging(tokens_per_step, mfu_per_tokens_per_s, lambda v: mean_over_ranks(v, engine.device),
                             [source["name"] for source in sources] if sources is not None else None),
                 Evaluation(eval_sets, cfg.train.eval_every),
                 Checkpointing(cfg.checkpoint, out, method.reference_step(), lambda v: over_ranks(v, device)),
                 DataSkip(skip.parse(cfg.data.skip), grad_accum, tokens_per_step),  # after the switch's checkpoint
                 *method.callbacks(),
                 LossPlot(out),
                 MemoryEvents(phases, build_peak, resumed=start.resume, over_ranks=lambda v: over_ranks(v, device),
                              plan=plan)]
    trainer = Trainer(cfg, method, engine, batches, metrics, callbacks, tokens_per_step=tokens_per_step,
                      train_tokens=train_tokens)
    if start.saved is not None:
        trainer.load_state_dict(start.saved, resume=start.resume)
    if start.resume:
        metrics.truncate_after(trainer.state.step)
        metrics.log_event("resume", trainer.state.step, path=start.tag,
                          **({"universal": True} if start.universal else {}))  # written on another world size
    metrics.log_event("plan", trainer.state.step, peak_gib=round(plan.peak / GIB, 3),
                      device_gib=round(capacity / GIB, 3) if capacity is not None else None,
                      phases_gib={name: round(c.total / GIB, 3) for name, c in plan.phases.items()})
    if train_tokens:
        metrics.log_event("data", trainer.state.step, train_tokens=train_tokens)
    if sources is not None:
        metrics.log_event("data", trainer.state.step, mixture=sources)
    return trainer


def finish(trainer: Trainer, keep_engine: bool, stopped: str | None = None) -> dict:
    """Close the data workers and the logs; the summary of the run (the engine destroyed unless keep_engine)."""
    trainer.batches.close()  # the data workers, if any
    trainer.metrics.close()
    newest = run_dir.newest_checkpoint(trainer.cfg.train.output_dir)
    state, train_tokens = trainer.state, trainer.train_tokens
    summary = {**trainer.summary, "step": state.step, "stopped": stopped, "output_dir": trainer.cfg.train.output_dir,
               "checkpoint": newest, "tokens_seen": state.tokens_seen,
               "epochs": state.tokens_seen / train_tokens if train_tokens else None,
               **parameter_counts(trainer.engine.module), **optimizer_bytes(trainer.engine.ds)}
    if keep_engine:
        summary["engine"] = trainer.engine.ds
    else:
        trainer.engine.destroy()
    return summary


def check_model_settings(cfg, method, vocab_size: int, ds_config: dict | None = None) -> None:
    """What would otherwise fail after start-up, checked on the meta-device model (no memory): model.init_from is a
    model directory, data.seq_len fits, the model can be checkpointed if asked, the method's settings fit its linears,
    and the DeepSpeed JSON suits the method. One-line RunError."""
    try:
        if ds_config is not None:
            method.check_ds_config(ds_config)
        model = meta_model(cfg.model, vocab_size)
        check_seq_len(cfg, model.config.max_position_embeddings)
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing)
        method.check(model)
    except RunError:
        raise
    except ValueError as e:
        raise RunError(str(e)) from None


def check_seq_len(cfg, max_positions: int) -> None:
    if cfg.data.seq_len > max_positions:
        raise RunError(f"data.seq_len {cfg.data.seq_len} is longer than {describe(cfg.model)} supports "
                       f"({max_positions} positions)")


def flops_per_token_full(cfg, model) -> int | None:
    """Full-rank training FLOPs per token of the run's model (model.counts.flops_per_token of the built module, or
    of a transformers config's model on the meta device: every family, model.hf_config and model.init_from alike),
    whatever the method, like the benchmark's MFU; None for a config that builds no countable model (no MFU)."""
    try:
        return flops_per_token(model, cfg.data.seq_len)["full"]
    except ValueError:
        return None


def peak_flops_per_device(cfg, ds_config: dict, device) -> float | None:
    """Peak FLOP/s of one device for MFU: log.peak_tflops, else the GPU's dense bf16/fp16 peak by name
    (relora_ds/hardware.py); None on CPU, on an unlisted GPU, and on fp32 runs (the table holds no fp32 peaks)."""
    gpu_name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    peak, _ = hardware.peak_flops_per_device(cfg.log.peak_tflops, gpu_name, dsc.precision(ds_config),
                                             option="log.peak_tflops")
    return peak

"""The training loop: build → deepspeed.initialize → step → restart / eval / log / checkpoint.

Reads top to bottom: `train(cfg)` sets up, then one loop over optimizer steps. The training method (relora_ds/
methods/: full, lora, relora) says when adapters are placed, when a restart is due and what the LR multiplier is;
the loop holds no mode strings. Everything DeepSpeed-specific sits in relora_ds/engine/; the ReLoRA math in
relora_ds/relora/.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from relora_ds import dist, hardware, methods
from relora_ds.config import RunConfig
from relora_ds.data import loader as data_loader
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine import checkpoint, ds_config as dsc, runtime, zero
from relora_ds.memory import GIB, PhaseMemory, fix_heap_threshold, release_memory
from relora_ds.metrics import Metrics
from relora_ds.model.build import describe, meta_model, model_from_config
from relora_ds.model.counts import flops_per_token, parameter_counts
from relora_ds.plots import plot_loss


class RunError(ValueError):
    """A run that cannot start (output dir, checkpoint, data/model mismatch); one line."""


class NonFiniteError(RunError):
    """A non-finite loss or gradient norm: every rank stops at the same step with the same message."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step  # the optimizer step that was not taken (loss) or whose update is kept (gradient norm)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs; identical on every rank."""

    step: int = 0                  # optimizer steps done
    restart_index: int = 0         # merges done (A's generator index of the last draw)
    wrapped: bool = False          # ReLoRA layers in place (after the warm-start switch)
    relora_start: int = 0          # step at which ReLoRA started (S)
    tokens_seen: int = 0
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --- building blocks ----------------------------------------------------------------------------------

def switch_to_adapters(method: methods.Method, model, ds_config: dict):
    """Warm start → adapters in the same run: the full-rank engine's own module (runtime.release_module, the old
    engine dropped by the caller) is wrapped in place by the method and handed to a new engine.

    Nothing is copied or gathered: W keeps its storage (its partition on ZeRO-3) and becomes frozen; the old
    optimizer (masters, moments) is freed before the new one is made, so the switch costs no more memory than
    the full-rank steps. The new optimizer covers the adapters (+ embeddings, norms, head) and starts fresh.
    """
    method.wrap(model)
    release_memory()  # the old engine's reference cycles, and its freed pages
    return runtime.make_engine(model, ds_config)


def train_step(engine, batches, grad_accum: int, *, step: int, grad_norm: bool) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over `grad_accum` micro-batches: (this rank's mean loss as a 0-dim tensor on the device,
    the global gradient norm or None). `relora-ds train` and `relora-ds bench` both step through this function.

    The losses stay on the device (no sync per micro-batch); read the returned tensor only on the steps that log.
    grad_norm: also return the norm (it costs a sync; only on the steps that log). Non-finite values stop every rank
    at the same step with the same NonFiniteError: one all-reduced flag per step says whether any rank's loss is
    non-finite, before the optimizer step (so nothing is stepped); the global gradient norm that DeepSpeed computes
    in its step (ZeRO-1/2/3, bf16) is the same on every rank. No graph outlives the step (its backward hooks hold
    the engine): the sum is of detached losses.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    for micro in range(grad_accum):
        loss = engine(**_move(next(batches), engine.device)).loss
        engine.backward(loss)
        loss_sum += loss.detach().float()
        del loss
        if micro < grad_accum - 1:
            engine.step()  # not a boundary: DeepSpeed accumulates
    bad = (~torch.isfinite(loss_sum)).to(torch.float64).reshape(1)
    if dist.all_reduce(bad, "max").item() > 0:  # the step's one sync; naming the ranks costs a second, once
        bad_ranks = [r for r, flag in enumerate(_over_ranks(float(not torch.isfinite(loss_sum)), engine.device)) if flag]
        raise NonFiniteError(f"training stopped at step {step}: the loss is not finite on rank(s) "
                             f"{', '.join(map(str, bad_ranks))}; nothing was stepped and the newest complete checkpoint "
                             f"is kept (lower schedule.lr, or check relora.prune_ratio / schedule.restart_warmup_steps)",
                             step)
    if grad_norm:
        norm = runtime.step_with_grad_norm(engine)
    else:
        engine.step()
        norm = runtime.global_grad_norm(engine)
    if norm is not None and not math.isfinite(norm):
        raise NonFiniteError(f"training stopped at step {step}: the gradient norm is {norm}; the newest complete "
                             f"checkpoint is kept (lower schedule.lr or set train.max_grad_norm)", step)
    return loss_sum / grad_accum, norm if grad_norm else None


def adapters_of(engine) -> dict:
    return {n: p for n, p in engine.module.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def restart_layout(engine) -> zero.Layout | None:
    """The restart's view of a new engine over wrapped layers (ReLoRA and LoRA alike), chosen once, with the
    fail-fast checks (zero.layout_for: settings, layout, coverage of the adapters' masters and, where they exist
    yet, moments; `layout.moments_checked` is False on ZeRO-0 until the first step); None without adapters."""
    adapters = adapters_of(engine)
    return zero.layout_for(engine, adapters) if adapters else None


def check_model_settings(cfg: RunConfig, method: methods.Method, vocab_size: int) -> None:
    """What would otherwise fail after start-up, checked on the meta-device model (no memory): model.init_from is a
    model directory, data.seq_len fits, and the method's settings (relora.target_modules / relora.rank) fit its
    linears. One-line RunError."""
    try:
        model = meta_model(cfg.model, vocab_size)
        check_seq_len(cfg, model.config.max_position_embeddings)
        method.check(model)
    except RunError:
        raise
    except ValueError as e:
        raise RunError(str(e)) from None


def check_seq_len(cfg: RunConfig, max_positions: int) -> None:
    if cfg.data.seq_len > max_positions:
        raise RunError(f"data.seq_len {cfg.data.seq_len} is longer than {describe(cfg.model)} supports "
                       f"({max_positions} positions)")


def _move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, batches: list[dict]) -> dict:
    """Mean held-out loss over `batches` (this rank's share), averaged over ranks; and perplexity."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # on the device: NCCL reduces there
    for batch in batches:
        loss = engine(**_move(batch, engine.device)).loss
        total[0] += loss.double() * batch["input_ids"].numel()
        total[1] += batch["input_ids"].numel()
    engine.train()
    if dist.is_initialized():
        import torch.distributed as tdist

        tdist.all_reduce(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def flops_per_token_full(cfg: RunConfig, model) -> int | None:
    """Full-rank training FLOPs per token of the run's model (model.counts.flops_per_token of the built module, or
    of a transformers config's model on the meta device: every family, model.hf_config and model.init_from alike),
    whatever the mode, like the benchmark's MFU; None for a config that builds no countable model (no MFU)."""
    try:
        return flops_per_token(model, cfg.data.seq_len)["full"]
    except ValueError:
        return None


def peak_flops_per_device(cfg: RunConfig, ds_config: dict, device) -> float | None:
    """Peak FLOP/s of one device for MFU: log.peak_tflops, else the GPU's dense bf16/fp16 peak by name
    (relora_ds/hardware.py); None on CPU, on an unlisted GPU, and on fp32 runs (the table holds no fp32 peaks)."""
    gpu_name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    peak, _ = hardware.peak_flops_per_device(cfg.log.peak_tflops, gpu_name, dsc.precision(ds_config),
                                             option="log.peak_tflops")
    return peak


def _over_ranks(value: float, device) -> list[float]:
    """`value` of every rank, in rank order (collective)."""
    values = torch.zeros(dist.world_size() if dist.is_initialized() else 1, dtype=torch.float64, device=device)
    values[dist.rank() if dist.is_initialized() else 0] = value
    return dist.all_reduce(values).tolist()


def _mean_over_ranks(value: float, device) -> float:
    total = dist.all_reduce(torch.tensor([value], dtype=torch.float64, device=device))
    return total.item() / (dist.world_size() if dist.is_initialized() else 1)


# What a run writes into train.output_dir besides checkpoints/ and the data cache/ (kept: its key is the data).
RUN_RECORDS = ("config.yaml", "ds_config.json", "metrics.jsonl", "loss.png", "wandb_run_id", "tensorboard")
PREVIOUS_ATTEMPTS = "previous_attempts"


def prepare_output_dir(cfg: RunConfig) -> str | None:
    """Check train.output_dir against train.resume; return the checkpoint tag to resume from (or None).

    false: a directory holding another run (config.yaml) is refused. true: the newest complete checkpoint,
    or a CheckpointError. auto: the newest complete checkpoint if there is one; else a fresh start, and the records
    of an attempt that died before its first complete checkpoint (RUN_RECORDS) are moved to
    previous_attempts/NNN/ (rank 0), so the new run's metrics.jsonl, wandb run and TensorBoard start empty.
    Torn checkpoints are never resumed; a later save removes them. Damaged ones (files that no longer match their
    MANIFEST.json) are moved to checkpoints/damaged/ with a warning, never deleted.
    """
    out = cfg.train.output_dir
    resume = cfg.train.resume
    if resume:  # true or "auto"
        try:
            return checkpoint.find_resume_checkpoint(out)  # damaged tags are moved aside, never deleted
        except checkpoint.CheckpointError as e:
            if resume != "auto":
                raise checkpoint.CheckpointError(f"{e}; train.resume=auto (--resume auto) starts fresh instead "
                                                 f"when there is none") from None
        if dist.is_rank_zero():
            moved_to = set_aside_previous_attempt(out)
            if moved_to:
                print(f"train.resume=auto: no complete checkpoint in {out}; starting fresh (the previous "
                      f"attempt's records were moved to {moved_to})", flush=True)
        return None
    if os.path.isfile(os.path.join(out, "config.yaml")):
        raise RunError(f"{out}: holds another run (config.yaml exists); choose a new train.output_dir or set "
                       f"train.resume=true (or auto) to continue it")
    return None


def set_aside_previous_attempt(out: str) -> str | None:
    """Move the RUN_RECORDS found in `out` to a new `out`/previous_attempts/NNN/; return it (None: nothing)."""
    found = [name for name in RUN_RECORDS if os.path.lexists(os.path.join(out, name))]
    if not found:
        return None
    parent = os.path.join(out, PREVIOUS_ATTEMPTS)
    os.makedirs(parent, exist_ok=True)
    index = 1 + max((int(n) for n in os.listdir(parent) if n.isdigit()), default=0)
    target = os.path.join(parent, f"{index:03d}")
    os.makedirs(target)
    for name in found:
        os.replace(os.path.join(out, name), os.path.join(target, name))
    return target


def start_source(cfg: RunConfig, resume_tag: str | None) -> tuple[str | None, dict | None]:
    """(checkpoint tag, its run state) the run starts from: `resume_tag`, or relora.warm_start_checkpoint (a saved
    full-rank run; relora.warm_start_steps 0 is then set to its step), or (None, None) for a fresh model."""
    start_tag = resume_tag or (checkpoint.find_checkpoint(cfg.relora.warm_start_checkpoint)
                               if cfg.relora.warm_start_checkpoint else None)
    saved = checkpoint.read_state(start_tag) if start_tag else None
    if saved is not None and not resume_tag:  # adapters on a saved full-rank checkpoint
        if saved["wrapped"]:
            raise RunError(f"relora.warm_start_checkpoint {start_tag}: is already a ReLoRA checkpoint; "
                           f"use train.resume to continue it")
        if cfg.relora.warm_start_steps == 0:
            cfg.relora.warm_start_steps = saved["step"]
        elif cfg.relora.warm_start_steps != saved["step"]:
            raise RunError(f"relora.warm_start_steps {cfg.relora.warm_start_steps} disagrees with the "
                           f"warm-start checkpoint's step {saved['step']} ({start_tag}); set it to 0 or {saved['step']}")
    return start_tag, saved


def start_engine(cfg: RunConfig, method: methods.Method, ds_config: dict, vocab_size: int, batches,
                 start_tag: str | None, saved: dict | None, resume: bool):
    """(engine, state, the engine's restart layout or None): a new model, or one restored from `start_tag` (resume:
    everything; else a full-rank warm start: the module only, the step count and data position carry on, and the
    method's switch then happens in the loop). Wraps before the engine is made when the checkpoint was wrapped or the method places its
    adapters at step 0 (no full-rank engine is made in vain). Restores the data position into `batches`."""
    state = TrainState()
    zero3_config = ds_config if dsc.zero_stage(ds_config) == 3 else None  # built partitioned, never whole
    model = model_from_config(cfg.model, vocab_size, seed=cfg.train.seed, zero3_config=zero3_config)
    check_seq_len(cfg, model.config.max_position_embeddings)
    resumed_wrapped = resume and saved["wrapped"]
    fresh_at_switch = saved is None and method.switch_step == 0
    if resumed_wrapped or fresh_at_switch:
        method.wrap(model)
    release_memory()  # what building freed (modules are built whole, then partitioned, on ZeRO-3)
    engine = runtime.make_engine(model, ds_config)
    layout = restart_layout(engine)
    if saved is not None:
        checkpoint.load(engine, start_tag, module_only=not resume)
        state = TrainState(**{k: saved[k] for k in TrainState().to_dict()})
        batches.load_state_dict(state.data)
        release_memory()
    state.wrapped = any(n.endswith("lora_A") for n, _ in engine.module.named_parameters())
    return engine, state, layout


# --- the run ------------------------------------------------------------------------------------------

def train(cfg: RunConfig, *, keep_engine: bool = False) -> dict:
    """Run training as configured; returns a summary (final step, losses, eval results, paths, total_params and
    trainable_params of the final model).

    The engine is destroyed before returning (its memory freed); keep_engine: it is returned as summary["engine"]
    instead, live, and the caller destroys it (tests that look at the trained model)."""
    cfg = cfg.resolved()
    runtime.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    resume_tag = prepare_output_dir(cfg)
    dist.barrier()
    start_tag, saved = start_source(cfg, resume_tag)  # before the method: a warm-start checkpoint sets its step
    try:
        method = methods.from_config(cfg)
    except ValueError as e:
        raise RunError(str(e)) from None
    out = cfg.train.output_dir
    ckpt_dir = os.path.join(out, "checkpoints")

    ds_config = dsc.reconcile(dsc.load_ds_config(cfg.train.deepspeed_config), lr=cfg.schedule.lr,
                              world_size=world, max_grad_norm=cfg.train.max_grad_norm,
                              source=cfg.train.deepspeed_config)
    micro_bs, grad_accum = dsc.micro_batch_size(ds_config), dsc.grad_accum_steps(ds_config)
    if dsc.zero_stage(ds_config) == 3 and not torch.cuda.is_available():
        fix_heap_threshold()  # host RSS of the gather/free churn of ZeRO-3 CPU ranks (memory.py)

    # Data and tokenizer.
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if len(tokenizer) > vocab_size:
        raise RunError(f"model.vocab_size {vocab_size} is smaller than the tokenizer's vocabulary "
                       f"({len(tokenizer)} tokens, data.tokenizer); raise it or leave it unset")
    check_model_settings(cfg, method, vocab_size)  # before any rank reads data or builds anything
    cache_dir = os.path.join(out, "cache")
    train_set = data_loader.dataset_from_config(cfg.data, tokenizer, split="train", cache_dir=cache_dir)
    # Tokens in one epoch of the training data: known for map-style (packed) data, not for a stream.
    train_tokens = train_set.num_tokens if isinstance(train_set, data_loader.PackedDataset) else None
    val_set = data_loader.dataset_from_config(cfg.data, tokenizer, split="validation", cache_dir=cache_dir)
    batches = data_loader.DistributedBatches(train_set, micro_batch_size=micro_bs, rank=rank, world_size=world,
                                             seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                             prefetch_batches=cfg.data.prefetch_batches)
    eval_set = (data_loader.eval_batches(val_set, micro_batch_size=micro_bs, max_batches=cfg.train.eval_batches,
                                         rank=rank, world_size=world) if val_set is not None else [])

    # Model, adapters, engine: fresh, resumed, or ReLoRA from a saved full-rank checkpoint.
    device = runtime.device()
    phases = PhaseMemory(device)
    engine, state, layout = start_engine(cfg, method, ds_config, vocab_size, batches, start_tag, saved,
                                         resume=resume_tag is not None)
    build_peak = phases.end("build")

    if rank == 0:
        os.makedirs(out, exist_ok=True)
        cfg.save(os.path.join(out, "config.yaml"))
        with open(os.path.join(out, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)
    metrics = Metrics(out, total_steps=cfg.train.total_steps, rank=rank, every=cfg.log.every,
                      progress=cfg.log.progress, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                      wandb_entity=cfg.log.wandb_entity, run_name=cfg.log.run_name, tags=cfg.log.tags,
                      tensorboard=cfg.log.tensorboard, config=cfg.to_dict())
    if resume_tag:
        metrics.truncate_after(state.step)
        metrics.log_event("resume", state.step, path=resume_tag)

    def log_memory(phase: str, peak: int | None = None) -> None:
        """Log the peak memory of the phase that just ended on every rank (collective; a "memory" event)."""
        peak = phases.end(phase) if peak is None else peak
        per_rank = _over_ranks(float(peak or 0) / GIB, device)
        metrics.log_event("memory", state.step, phase=phase, peak_gib=round(max(per_rank), 3),
                          rank_peak_gib=[round(v, 3) for v in per_rank], kind=phases.kind)

    log_memory("resume" if resume_tag else "build", build_peak)
    if train_tokens:
        metrics.log_event("data", state.step, train_tokens=train_tokens)
    tokens_per_step = micro_bs * grad_accum * world * cfg.data.seq_len
    # MFU = tokens/s per device × full-rank FLOPs per token / peak FLOP/s per device (None: left out of the log).
    model_flops = flops_per_token_full(cfg, engine.module)  # wrapped or not: the same linears, counted as built
    peak_flops = peak_flops_per_device(cfg, ds_config, engine.device)
    mfu_per_tokens_per_s = model_flops / peak_flops / world if model_flops and peak_flops else None
    summary = {"evals": [], "losses": {}, "grad_norms": {}, "restarts": []}

    def run_eval():
        if not eval_set:
            return
        log_memory("steps")
        result = evaluate(engine, eval_set)
        log_memory("eval")
        metrics.log_event("eval", state.step, **result)
        summary["evals"].append({"step": state.step, **result})
        if rank == 0:
            plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))

    def save_checkpoint(reference: bool = False):
        state.data = batches.state_dict()
        log_memory("steps")
        tag_dir = checkpoint.save(engine, ckpt_dir, step=state.step, keep_last=cfg.checkpoint.keep_last,
                                  state={**state.to_dict(), "config": cfg.to_dict()}, reference=reference)
        metrics.log_event("checkpoint", state.step, path=tag_dir, **({"reference": True} if reference else {}))
        log_memory("checkpoint")

    if state.step == 0 and cfg.train.eval_every > 0:
        run_eval()
    last_log_step, last_log_time = state.step, time.perf_counter()
    data_iter = iter(batches)
    while state.step < cfg.train.total_steps:
        if state.step == method.reference_step():  # before the switch: the full-rank W that analyze subtracts
            save_checkpoint(reference=True)
        # Warm start → adapters (also when resuming from, or starting at, the switch step).
        if method.switch_due(state):
            log_memory("steps")
            model = runtime.release_module(engine)
            engine = None  # the old engine and its optimizer go before the new one is made
            engine = switch_to_adapters(method, model, ds_config)
            layout = restart_layout(engine)
            state.wrapped, state.relora_start = True, state.step
            metrics.log_event("switch", state.step)
            log_memory("switch")
        # ReLoRA's merge, re-init and optimizer reset.
        if method.restart_due(state):
            log_memory("steps")
            record = method.restart(engine, state, layout)
            metrics.log_event("restart", state.step, **{k: v for k, v in record.to_dict().items() if k != "step"})
            summary["restarts"].append(record.to_dict())
            log_memory("restart")

        lr = cfg.schedule.lr * method.lr_multiplier(state)
        runtime.set_lr(engine, lr)
        logs = (state.step + 1) % cfg.log.every == 0 or state.step + 1 == cfg.train.total_steps
        local_loss, grad_norm = train_step(engine, data_iter, grad_accum, step=state.step + 1, grad_norm=logs)
        state.step += 1
        state.tokens_seen += tokens_per_step
        if layout is not None and not layout.moments_checked:  # ZeRO-0 makes them at the first step: check now
            layout.check_moments(adapters_of(engine))

        if logs:
            loss_value = _mean_over_ranks(local_loss.item(), engine.device)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (state.step - last_log_step) / max(now - last_log_time, 1e-9)
            # Values the run cannot measure (no grad norm from DeepSpeed, no known peak) are left out.
            values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                      "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * mfu_per_tokens_per_s if mfu_per_tokens_per_s else None}
            metrics.log_step(state.step, **{k: v for k, v in values.items() if v is not None},
                             next_restart=method.next_event(state))
            summary["losses"][state.step] = loss_value
            if grad_norm is not None:
                summary["grad_norms"][state.step] = grad_norm
            last_log_step, last_log_time = state.step, now
        if cfg.train.eval_every > 0 and state.step % cfg.train.eval_every == 0:
            run_eval()
        if cfg.checkpoint.every > 0 and state.step % cfg.checkpoint.every == 0:
            save_checkpoint()

    if cfg.train.eval_every > 0 and state.step % cfg.train.eval_every != 0:
        run_eval()
    if cfg.checkpoint.save_final and (cfg.checkpoint.every == 0 or state.step % cfg.checkpoint.every != 0):
        save_checkpoint()
    if not cfg.checkpoint.save_final:
        log_memory("steps")
    if rank == 0:
        plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
    batches.close()  # the data workers, if any
    metrics.close()
    newest = checkpoint.find_checkpoint(ckpt_dir, checksums=False) if checkpoint.complete_tags(ckpt_dir) else None
    summary.update(step=state.step, output_dir=out, checkpoint=newest, tokens_seen=state.tokens_seen,
                   epochs=state.tokens_seen / train_tokens if train_tokens else None,
                   **parameter_counts(engine.module))
    if keep_engine:
        summary["engine"] = engine
    else:
        engine.destroy()
    return summary

"""The run's model under DeepSpeed, as one object: `TrainEngine`.

It owns the DeepSpeed engine and the restart `Layout` of its adapters, the re-make at the warm-start switch, the
optimizer step with its gradient norm, evaluation forward passes, and checkpoint save and load. The trainer and its
callbacks talk to this object and never see DeepSpeed or a Layout; the training method (relora_ds/methods/) says
which parameters train, with which optimizer, and changes the module through `remake`.
"""

import math
from dataclasses import dataclass

import torch

from relora_ds import dist
from relora_ds.engine import checkpoint, ds_config as dsc, runtime, universal, zero
from relora_ds.errors import NonFiniteError
from relora_ds.memory import release_memory
from relora_ds.model.build import model_from_config


class TrainEngine:
    """One DeepSpeed engine at a time over the run's module; see the module docstring."""

    def __init__(self, method, ds_config: dict):
        self.method = method
        self.ds_config = ds_config
        self.grad_accum = dsc.grad_accum_steps(ds_config)
        self.ds = None       # the DeepSpeed engine
        self.layout = None   # zero.Layout of the adapters, for the restart (None without adapters)
        self.wrapped = False  # whether the module holds adapters (set with each engine; saved with every checkpoint)
        self.source_sums = None  # a mixture's per-source [loss sum, tokens] since they were last taken (track_sources)

    # --- the engine ------------------------------------------------------------------------------------------
    def build(self, model: torch.nn.Module) -> None:
        """deepspeed.initialize over `model` with the method's parameters and optimizer (methods: `optimizer`), and
        the restart layout of its adapters, chosen once with its fail-fast checks (zero.layout_for)."""
        params, optimizer = self.method.optimizer(model, self.ds_config)
        self.ds = runtime.make_engine(model, self.ds_config, params=params, optimizer=optimizer)
        adapters = self.adapters()
        self.wrapped = bool(adapters)
        self.layout = zero.layout_for(self.ds, adapters) if adapters else None

    def remake(self, change) -> None:
        """Cut the module loose from its engine (optimizer, masters and moments freed first), `change(module)` in
        place, and build a new engine over it: the warm-start switch. Nothing of the module is copied or gathered."""
        model = runtime.release_module(self.ds)
        self.ds = self.layout = None  # the old engine and its optimizer go before the new one is made
        change(model)
        release_memory()  # the old engine's reference cycles, and its freed pages
        self.build(model)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def adapters(self) -> dict:
        return {n: p for n, p in self.ds.module.named_parameters() if n.endswith((".lora_A", ".lora_B"))}

    def frozen_weight_bytes(self) -> int:
        """Bytes of the wrapped layers' frozen W on this rank, as stored (relora.base_dtype; scales included; ZeRO-3:
        this rank's partitions); 0 before the adapters are placed."""
        return sum(m.weight_bytes() for m in self.ds.module.modules() if hasattr(m, "weight_bytes"))

    def destroy(self) -> None:
        self.ds.destroy()

    # --- a step ----------------------------------------------------------------------------------------------
    def step(self, batches, *, lr: float, step: int, grad_norm: bool,
             stop_signal: int = 0) -> tuple[torch.Tensor, float | None, int]:
        """One optimizer step at `lr` over grad_accum micro-batches (train_step): this rank's mean loss, the global
        gradient norm (steps with grad_norm), and the largest `stop_signal` over the ranks (0: none; a signal number
        relora_ds/stop.py recorded); checks the adapters' moments after the first step that makes them (ZeRO-0)."""
        runtime.set_lr(self.ds, lr)
        loss, norm, signalled = train_step(self.ds, batches, self.grad_accum, step=step, grad_norm=grad_norm,
                                           stop_signal=stop_signal, source_sums=self.source_sums)
        if self.layout is not None and not self.layout.moments_checked:
            self.layout.check_moments(self.adapters())
        return loss, norm, signalled

    def track_sources(self, count: int) -> None:
        """Sum each source's training loss from here (a mixture's `count` sources; batches carry each row's)."""
        self.source_sums = torch.zeros(2, count, dtype=torch.float64, device=self.device)

    def take_source_losses(self) -> list[float | None]:
        """Each source's mean training loss per token over every rank since the last call (None: no rows of it),
        and start again (a collective)."""
        losses, tokens = dist.all_reduce(self.source_sums).tolist()
        self.source_sums.zero_()
        return [loss / count if count > 0 else None for loss, count in zip(losses, tokens)]

    def evaluate(self, batches: list[dict], stop_signal=None) -> dict:
        return evaluate(self.ds, batches, stop_signal)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str, *, step: int, state: dict, keep_last: int, reference: bool = False) -> str:
        """checkpoint.save of the engine with the run `state` (identical on every rank); returns the tag dir."""
        return checkpoint.save(self.ds, checkpoint_dir, step=step, state={**state, "wrapped": self.wrapped},
                               keep_last=keep_last, reference=reference)

    def load(self, tag_dir: str, *, module_only: bool = False) -> None:
        """checkpoint.load into the engine: everything (resume) or the module only (a full-rank warm start)."""
        checkpoint.load(self.ds, tag_dir, module_only=module_only)
        release_memory()


def train_step(engine, batches, grad_accum: int, *, step: int, grad_norm: bool,
               stop_signal: int = 0, source_sums: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None, int]:
    """One optimizer step of the DeepSpeed `engine` over `grad_accum` micro-batches: (this rank's mean loss as a 0-dim
    tensor on the device, the global gradient norm or None, the largest `stop_signal` over the ranks). `relora-ds
    train` and `relora-ds bench` both step through this function.

    The losses stay on the device (no sync per micro-batch); read the returned tensor only on the steps that log.
    grad_norm: also return the norm (it costs a sync; only on the steps that log). Non-finite values stop every rank
    at the same step with the same NonFiniteError: one all-reduced flag per step says whether any rank's loss is
    non-finite, before the optimizer step (so nothing is stepped), and the same all-reduce carries this rank's stop
    signal (relora_ds/stop.py), so every rank learns of a signal any rank got, at no extra cost; the global gradient
    norm that DeepSpeed computes in its step (ZeRO-1/2/3, bf16) is the same on every rank. No graph outlives the
    step (its backward hooks hold the engine): the sum is of detached losses.

    source_sums (2 × sources, float64, on the device): a mixture's batches name each row's source ("source"); each
    row's loss sum and token count are added to its source's column (row_loss_sums, from the logits the forward made).
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    for micro in range(grad_accum):
        batch = _move(next(batches), engine.device)
        sources = batch.pop("source", None)
        out = engine(**batch)
        loss = out.loss
        if sources is not None and source_sums is not None:
            source_sums.index_add_(1, sources, torch.stack(row_loss_sums(out.logits, batch["labels"])).double())
        del out  # the logits: not held through the backward
        engine.backward(loss)
        loss_sum += loss.detach().float()
        del loss
        if micro < grad_accum - 1:
            engine.step()  # not a boundary: DeepSpeed accumulates
    flags = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float64),
                         torch.tensor(float(stop_signal), dtype=torch.float64, device=loss_sum.device)])
    bad, signalled = dist.all_reduce(flags, "max").tolist()  # the step's one sync
    if bad > 0:  # naming the ranks costs a second sync, once
        bad_ranks = [r for r, flag in enumerate(over_ranks(float(not torch.isfinite(loss_sum)), engine.device)) if flag]
        raise NonFiniteError(f"training stopped at step {step}: the loss is not finite on rank(s) "
                             f"{', '.join(map(str, bad_ranks))}; nothing was stepped and the newest complete checkpoint "
                             f"is kept (lower schedule.lr, or check relora.prune_ratio / schedule.restart_warmup_steps; "
                             f"to pass over the data around step {step} on resume: data.skip)", step)
    if grad_norm:
        norm = runtime.step_with_grad_norm(engine)
    else:
        engine.step()
        norm = runtime.global_grad_norm(engine)
    if norm is not None and not math.isfinite(norm):
        raise NonFiniteError(f"training stopped at step {step}: the gradient norm is {norm}; the newest complete "
                             f"checkpoint is kept (lower schedule.lr or set train.max_grad_norm)", step)
    return loss_sum / grad_accum, norm if grad_norm else None, int(signalled)


@torch.no_grad()
def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed next-token cross-entropy, its counted tokens): the loss the model computed, per row (labels
    shifted by one, -100 ignored), in fp32 over `chunk` positions at a time (no fp32 copy of all the logits)."""
    rows, length, vocab = logits.shape
    total = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    for start in range(0, length - 1, chunk):
        end = min(length - 1, start + chunk)
        target = labels[:, start + 1:end + 1]
        loss = torch.nn.functional.cross_entropy(logits[:, start:end].reshape(-1, vocab).float(), target.reshape(-1),
                                                 ignore_index=-100, reduction="none")
        total += loss.view(rows, -1).sum(1)
    return total, (labels[:, 1:] != -100).sum(1).float()


@torch.no_grad()
def evaluate(engine, batches: list[dict], stop_signal=None) -> dict:
    """Mean held-out loss over `batches` (this rank's share), averaged over ranks; and perplexity.

    stop_signal: a callable returning this rank's stop signal (relora_ds/stop.py; 0: none). Before each batch the
    ranks agree on the largest (one small all-reduce a batch), and at the first they abandon the evaluation together:
    {"stopped": signal number}. A scheduler's warning leaves seconds, not a long evaluation's minutes."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # on the device: NCCL reduces there
    for batch in batches:
        if stop_signal is not None:
            flag = torch.tensor([float(stop_signal())], dtype=torch.float64, device=engine.device)
            if (signalled := int(dist.all_reduce(flag, "max").item())):
                engine.train()
                return {"stopped": signalled}
        loss = engine(**_move(batch, engine.device)).loss
        total[0] += loss.double() * batch["input_ids"].numel()
        total[1] += batch["input_ids"].numel()
    engine.train()
    if dist.is_initialized():
        import torch.distributed as tdist

        tdist.all_reduce(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def over_ranks(value: float, device) -> list[float]:
    """`value` of every rank, in rank order (collective)."""
    values = torch.zeros(dist.world_size() if dist.is_initialized() else 1, dtype=torch.float64, device=device)
    values[dist.rank() if dist.is_initialized() else 0] = value
    return dist.all_reduce(values).tolist()


def mean_over_ranks(value: float, device) -> float:
    total = dist.all_reduce(torch.tensor([value], dtype=torch.float64, device=device))
    return total.item() / (dist.world_size() if dist.is_initialized() else 1)


def base_optimizer(engine):
    """The torch optimizer that holds the state (inside DeepSpeed's bf16 / ZeRO wrappers, if any)."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_bytes(engine) -> dict:
    """This rank's optimizer-state bytes (Adam moments, step counters) and fp32 master copies it keeps."""
    optimizer = base_optimizer(engine)
    state = sum(tensor_bytes(value) for per_param in optimizer.state.values()
                for value in per_param.values() if torch.is_tensor(value))
    module_storage = {p.data_ptr() for p in engine.module.parameters()}
    masters = sum(tensor_bytes(p) for group in optimizer.param_groups for p in group["params"]
                  if p.data_ptr() not in module_storage)
    return {"optimizer_state_bytes": state, "optimizer_master_bytes": masters}


def _move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class Start:
    """Where a run starts: a checkpoint tag (None: a fresh model), its saved run state, and whether it is this run's
    own (resume: everything is restored) or a full-rank warm start (the module only)."""

    tag: str | None = None
    saved: dict | None = None
    resume: bool = False
    universal: bool = False  # written on another world size: loaded as DeepSpeed's universal checkpoint (universal.py)


def start_engine(model_cfg, method, ds_config: dict, *, vocab_size: int, seed: int, start: Start,
                 prepare_model=None) -> TrainEngine:
    """A TrainEngine over a new model, or one restored from `start.tag`. The model is built partitioned on ZeRO-3
    (never whole) and handed to `prepare_model` (a one-line error for what cannot run, and the model options it sets:
    activation checkpointing); the method places its
    adapters before the engine is made when it holds them already (a resumed wrapped run: its state is loaded) or
    places them at step 0, so no full-rank engine is made in vain."""
    zero3_config = ds_config if dsc.zero_stage(ds_config) == 3 else None
    wrap_now = (start.resume and start.saved["wrapped"]) or (start.saved is None and method.switch_step == 0)
    per_module = method.wrap_while_building(dsc.param_dtype(ds_config)) if wrap_now and zero3_config is None else None
    model = model_from_config(model_cfg, vocab_size, seed=seed, zero3_config=zero3_config, per_module=per_module)
    if prepare_model is not None:
        prepare_model(model)
    if wrap_now and per_module is None:
        method.wrap(model)
    release_memory()  # what building freed (modules are built whole, then partitioned, on ZeRO-3)
    if start.universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine = TrainEngine(method, ds_config)
    engine.build(model)
    if start.tag is not None:
        engine.load(start.tag, module_only=not start.resume)
    if start.universal:
        universal.finish(start.tag, engine.module)
    return engine

"""`relora-ds plan`: the memory one rank needs in each phase of a run, before it runs, from the model built on the meta
device, the method, the DeepSpeed JSON and the rank count; whether it fits a device, and if not, the cheapest change
that makes it fit.

    plan = make_plan(cfg, ds_config, ranks=2)            # Plan: .phases {phase: Components}, .peak
    print(render(plan, device_bytes=24 * 2**30))

The terms, per rank, in bytes (N ranks, p = 2 in bf16 and 4 in fp32, T the trainable parameters of the phase):
- parameters: T·p, and the frozen W of the wrapped layers as stored (relora.base_dtype: auto = p, int8/fp8 = 1 plus
  4 per row); ZeRO-3 divides both by N.
- gradients: ZeRO-0 T·p; ZeRO-1/2 DeepSpeed's reduce bucket (allocated whole at reduce_bucket_size) and the rank's
  partition, or at the step its fp32 partition, whichever peaks higher (`_states`); ZeRO-3 T·p / N.
- masters: an fp32 copy of T (all but ZeRO-0 fp32, where torch's AdamW steps the parameters themselves); ZeRO-1+: / N.
- moments: Adam's two, 8 bytes per trainable parameter; ZeRO-1+: / N; and the optimizer step's fp32 temporaries
  (torch's foreach AdamW: one more of the partition).
- activations: what the backward keeps per token and decoder layer (see `layer_activation_bytes`), times what a CPU
  process holds per saved byte (ACTIVATION_HELD_PER_SAVED, measured), with train.activation_checkpointing full only
  each layer's input plus one layer recomputed; the logits in fp32.
- runtime: what the process holds besides (torch, DeepSpeed, transformers, the communication backend, the
  allocator), measured: RUNTIME_BASELINE, from the rehearsals named there.
- host: on a CUDA device, what zero_optimization.offload_optimizer / offload_param (cpu) keep in CPU memory instead
  (`_states`, `_params_offloaded`); not in the total. On the CPU accelerator offload moves nothing.
Phases: the build (whole in fp32, partitioned on ZeRO-3, or module by module with a stored W; then the engine made over
it), the full-rank warm start (when the method has one) and a checkpoint between its steps, the low-rank steps, the
restart (one layer's merge in fp32 on top), the checkpoint, the resume (the build again, or the engine with the pages of
the memory-mapped checkpoint it copies in) and the export (its own process, one tensor at a time).
"""

from dataclasses import dataclass, field

from relora_ds.engine import ds_config as dsc
from relora_ds.errors import RunError
from relora_ds.memory import GIB, returns_freed_host_memory

# The runtime a rank holds beyond the terms above, measured on this project's CPU rehearsals (benchmarks/results/
# *-scale-*.md: the peak of the steps minus the terms): the imported libraries (0.25-0.31 GiB bare), the engine, the
# communication buffers and what the allocator keeps.
RUNTIME_BASELINE = 0.6 * GIB
# `relora-ds export`'s own process (transformers, the tokenizer, the lazy reader), measured beside the rehearsals: the
# exports of 350m, 1b and 7b peak 0.47-0.55 GiB above the tensors they hold at once.
EXPORT_BASELINE = 0.5 * GIB
# What a CPU process holds per byte of the activations autograd saves (the backward's activation gradients, the
# forward's temporaries and glibc's slack besides), measured: 60m, seq 512, micro-batch 8 (benchmarks/README.md,
# "Activation checkpointing") saves 1.74 GiB from none to full and 0.90 to selective against 1.17 and 0.63 GiB of
# saved tensors (1.49 and 1.43). On CUDA 1: no GPU run yet.
ACTIVATION_HELD_PER_SAVED = 1.5
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "fp8": 1}


PHASES = ("build", "full-rank steps", "full-rank checkpoint", "low-rank steps", "restart", "checkpoint", "resume",
          "export")


class PlanError(RunError):
    """Sizes that cannot be planned (one line, printed by the command line as an error)."""


@dataclass
class Counts:
    """What the plan needs of the model: parameters (tied once), the wrapped layers' weights and rows, the adapters'
    parameters at the run's rank, the largest wrapped weight, and the shapes activations scale with."""

    total: int
    wrapped: int
    wrapped_rows: int
    adapters: int
    largest: int
    largest_trainable_full: int
    largest_trainable_low: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int


@dataclass
class Components:
    parameters: float = 0.0
    frozen_w: float = 0.0
    gradients: float = 0.0
    masters: float = 0.0
    moments: float = 0.0
    activations: float = 0.0
    transient: float = 0.0
    runtime: float = RUNTIME_BASELINE
    host: float = 0.0  # offloaded to CPU memory on a CUDA device (zero_optimization.offload_*); not in the total

    @property
    def total(self) -> float:
        return (self.parameters + self.frozen_w + self.gradients + self.masters + self.moments + self.activations
                + self.transient + self.runtime)


@dataclass
class Plan:
    ranks: int
    stage: int
    precision: str
    base_dtype: str
    checkpointing: str
    micro_batch: int
    accelerator: str = "cpu"
    phases: dict = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return max(c.total for c in self.phases.values())


def model_counts(cfg, vocab_size: int) -> Counts:
    """The counts of the run's model, read from it on the meta device (no memory)."""
    from relora_ds.model.build import meta_model
    from relora_ds.model.counts import _wrapped, param_count

    model = meta_model(cfg.model, vocab_size)
    wrapped = _wrapped(model, cfg.relora.target_modules)
    config = model.config
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    unwrapped = [n for name, n in sizes.items() if name.rsplit(".", 1)[0] not in wrapped]
    return Counts(
        total=param_count(model), wrapped=sum(o * i for o, i in wrapped.values()),
        wrapped_rows=sum(o for o, _ in wrapped.values()),
        adapters=sum(cfg.relora.rank * (o + i) for o, i in wrapped.values()),
        largest=max((o * i for o, i in wrapped.values()), default=0),
        largest_trainable_full=max(sizes.values()), largest_trainable_low=max(unwrapped, default=0),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        vocab=model.get_input_embeddings().weight.shape[0])


def layer_activation_bytes(counts: Counts, p: int, rank: int) -> float:
    """What the backward keeps of one token in one decoder layer (the tensors autograd saves, counted with
    torch.autograd.graph.saved_tensors_hooks in tests/unit/test_plan.py): the two RMSNorms' fp32 input and normalized
    input (4 · 4h); in the run's dtype the norms' outputs (2h), q, k, v and the attention output (4h; SDPA and flash
    attention keep no attention matrix), the MLP's gate, activation, up and product (4i), and the adapters' x·Aᵀ (7r)."""
    h, i = counts.hidden, counts.intermediate
    return p * (6 * h + 4 * i + 7 * rank) + 16 * h


def activation_bytes(counts: Counts, tokens: int, p: int, rank: int, checkpointing: str,
                     held_per_saved: float = 1.0) -> float:
    """What the steps hold for the activations of one micro-batch of `tokens` tokens: the decoder layers' saved
    tensors (layer_activation_bytes) times `held_per_saved` (what the process holds per saved byte: the backward's
    gradients and the allocator's slack besides; ACTIVATION_HELD_PER_SAVED on CPU), and the logits, their
    log-softmax and gradient in fp32 (3·4V). With checkpointing full the layers keep their inputs (h) plus one layer
    recomputed; selective: the MLP's own (4i + 3r; its input, the norm's output, is kept) recomputed, one layer's at a
    time."""
    h, i = counts.hidden, counts.intermediate
    per_layer = layer_activation_bytes(counts, p, rank)
    if checkpointing == "none":
        layers = counts.layers * per_layer
    elif checkpointing == "selective":  # the MLP's gate, activation, up and product are recomputed; its input is kept
        mlp = p * (4 * i + 3 * rank)
        layers = counts.layers * (per_layer - mlp) + mlp
    else:
        layers = counts.layers * p * h + per_layer
    return tokens * (held_per_saved * layers + 12 * counts.vocab)


# DeepSpeed's reduction bucket of ZeRO-1/2 (elements) when the JSON sets none, and the flat copies ZeRO-0 all-reduces
# gradients through (engine.MEMORY_OPT_ALLREDUCE_SIZE, not configurable).
REDUCE_BUCKET_DEFAULT = 5e8
ALLREDUCE_BUCKET = 5e8


def _states(c: Components, trainable: int, largest: int, p: int, stage: int, precision: str, n: int,
            foreach: bool, offload_optimizer: bool = False, reduce_bucket: float = REDUCE_BUCKET_DEFAULT,
            overlap_comm: bool = False, heap_keeps: bool = False, touched_only: bool = False) -> float:
    """Parameters, gradients, masters, moments and the steps' temporaries of `trainable` parameters (the largest of
    them `largest`), as DeepSpeed 0.19 lays them out, at the larger of the backward's and the optimizer step's peaks
    (checked against the bytes a real engine allocates: benchmarks/plan_terms.py, tests/e2e/test_plan_engine.py):
    - ZeRO-0: the module's gradients (bf16: BF16_Optimizer's fp32 accumulators too); AdamW steps each tensor, its
      temporaries two of the largest (torch's foreach AdamW on CUDA: one partition's worth). Beyond one rank an fp32
      run all-reduces the module's gradients through flat copies of up to 5e8 elements (DeepSpeed's
      MEMORY_OPT_ALLREDUCE_SIZE; BF16_Optimizer reduces its accumulators in place): the larger of that and AdamW's.
    - ZeRO-1/2: DeepSpeed reduces the gradients through a bucket of reduce_bucket_size elements, allocated whole
      whatever the model's size (two with overlap_comm), and copies the rank's share into a gradient partition.
      Backward, ZeRO-1: the module's gradients, all alive at the boundary until each is copied into the bucket, beside
      the partition; ZeRO-2: one module gradient at a time beside the bucket and the partition. Beyond one rank the
      reduce-scatter holds half a filled bucket more (gloo, measured). At the step the rank's fp32 gradient partition
      (a bf16 run's is freed once converted) and AdamW's temporaries over the one flat fp32 partition it steps: two
      of it (foreach: one). heap_keeps (a CPU process whose heap keeps what it frees, memory.returns_freed_host_memory
      false): ZeRO-1's module gradients, freed as they are copied into the bucket, stay resident through the step.
      touched_only (a CPU rank, measured by its resident set): of a bucket larger than the model only the part ever
      filled is resident (torch.empty maps pages, a write makes them resident); CUDA counts the allocation.
    - ZeRO-3: the rank's gradient partition (module gradients are freed as they are reduced), and at the step a bf16
      run's fp32 gradient partition and AdamW's temporaries.
    Returns the step's temporaries (in c.transient).
    offload_optimizer (a CUDA device with zero_optimization.offload_optimizer cpu): the masters, moments and the rank's
    fp32 gradient partition are in host memory (c.host), and the step runs there (DeepSpeedCPUAdam, in place: no
    temporaries on the device); the device keeps the parameters, the module's gradients and the reduction bucket."""
    shard = n if stage >= 1 else 1
    c.parameters = trainable * p / (n if stage >= 3 else 1)
    if not (stage == 0 and precision == "fp32"):
        c.masters = trainable * 4 / shard
    c.moments = trainable * 8 / shard
    if stage in (1, 2):
        filled = min(reduce_bucket, trainable) * p
        buckets = (filled if touched_only else reduce_bucket * p) * (2 if overlap_comm else 1)
        partition = trainable * p / n
        scatter = 0.5 * filled if n > 1 else 0.0
        if stage == 1:
            backward = trainable * p - filled + buckets + partition + scatter
        else:
            backward = (largest * p if reduce_bucket < trainable else 0.0) + buckets + partition + scatter
        adam = trainable * 4 / n if foreach else 2 * 4 * trainable / n
        step = trainable * 4 / n + adam + (trainable * p if stage == 1 and heap_keeps else 0.0)
        if offload_optimizer:
            c.host += c.masters + c.moments + trainable * 4 / n
            c.gradients = backward - (partition if stage == 2 else 0.0)
            c.masters = c.moments = c.transient = 0.0
        else:
            c.gradients, c.transient = (backward, 0.0) if backward >= step else (step - adam, adam)
        return c.transient
    c.gradients = trainable * p + (trainable * 4 if precision == "bf16" else 0) if stage == 0 else trainable * p / n
    step_grad = trainable * 4 / shard if precision == "bf16" and stage >= 1 else 0
    c.transient = step_grad + (trainable * 4 / shard if foreach else 2 * 4 * largest)
    if stage == 0 and precision == "fp32" and n > 1:
        c.transient = max(c.transient, min(ALLREDUCE_BUCKET, trainable) * p)
    if offload_optimizer:  # ZeRO-3: its gradient partition goes to the host too
        c.host += c.masters + c.moments + trainable * 4 / shard
        c.gradients = c.masters = c.moments = c.transient = 0.0
    return c.transient


def _params_offloaded(c: Components) -> Components:
    """`c` with ZeRO-3's parameter partitions, the frozen W's included, in host memory (offload_param cpu on a CUDA
    device): the device holds only the gathered parameters (zero3_buffers)."""
    return Components(**{**c.__dict__, "parameters": 0.0, "frozen_w": 0.0,
                         "host": c.host + c.parameters + c.frozen_w})


def _between_steps(steps: Components, step_temporaries: float, stage: int, heap_returns: bool, accelerator: str,
                   trainable: int, p: int) -> Components:
    """`steps` as a process holds it between two steps: without the activations, and without what the steps freed
    where the memory goes back (glibc hands large blocks back at once: ZeRO-1/2's flat gradient buffers and the step's
    temporaries over its flat partition; the rest where the trainer fixes the heap threshold, `heap_returns`). On
    CUDA the caching allocator keeps what the steps freed. ZeRO-1's module gradients are tensors of each parameter's
    size, below glibc's threshold: the heap keeps their pages unless the threshold is fixed."""
    held = Components(**{**steps.__dict__, "activations": 0.0})
    if accelerator == "cuda":
        return held
    if stage in (1, 2):
        held.gradients = trainable * p if stage == 1 and not heap_returns else 0.0
        held.transient = 0.0
        return held
    held.transient -= step_temporaries if heap_returns else 0.0
    return held


def engine_made(steps: Components, trainable: int, p: int, stage: int, precision: str, n: int,
                offload_optimizer: bool = False) -> Components:
    """What making the DeepSpeed engine over `trainable` parameters holds at its peak, from the steps' Components:
    the parameters, masters and the gradient buffers it makes at once (`engine_gradients`); ZeRO-1/2 flatten the
    parameters (the module's and the flat copy at once), then clone the rank's partition into the fp32 masters (a
    cast's copy beside them); ZeRO-0 bf16 (BF16_Optimizer) steps once over zero gradients to make Adam's moments: the
    steps' peak. Other engines make their moments with the first step."""
    engine = Components(**{**steps.__dict__, "gradients": engine_gradients(trainable, p, stage, precision, n),
                           "moments": 0.0, "activations": 0.0, "transient": 0.0})
    if stage in (1, 2) and not offload_optimizer:
        engine.transient = max(trainable * p - engine.masters, engine.masters)
    elif stage == 0 and precision == "bf16":
        engine = Components(**{**steps.__dict__, "activations": 0.0})
    return engine


def engine_gradients(trainable: int, p: int, stage: int, precision: str, n: int) -> float:
    """The gradient buffers a DeepSpeed engine holds before its first step: ZeRO-3 its gradient partition, ZeRO-0 bf16
    BF16_Optimizer's fp32 accumulators; the module's gradients and ZeRO-1/2's buckets and partitions come with the
    first backward."""
    if stage == 3:
        return trainable * p / n
    return trainable * 4 if stage == 0 and precision == "bf16" else 0.0


ZERO3_BUFFERS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}


def zero3_buffers(ds_config: dict, p: int, parameters: int) -> float:
    """ZeRO-3's gathered and bucketed parameters and gradients: the reduce bucket, the prefetch bucket and the live
    parameters, each at most `parameters` elements (DeepSpeed's defaults unless the JSON sets them); 0 below ZeRO-3."""
    if dsc.zero_stage(ds_config) != 3:
        return 0.0
    zero = ds_config.get("zero_optimization", {})
    return sum(min(float(zero.get(key, default)), parameters) * p for key, default in ZERO3_BUFFERS.items())


def make_plan(cfg, ds_config: dict, ranks: int, vocab_size: int, counts: Counts | None = None,
              accelerator: str = "cpu") -> Plan:
    """The per-rank memory of each phase of the run `cfg` under `ds_config` on `ranks` ranks of `accelerator`
    (cpu or cuda)."""
    from relora_ds import methods

    if ranks < 1:
        raise PlanError(f"--ranks must be >= 1, got {ranks}")
    method = methods.from_config(cfg)
    counts = counts or model_counts(cfg, vocab_size)
    stage, precision = dsc.zero_stage(ds_config), dsc.precision(ds_config)
    p = 4 if precision == "fp32" else 2
    micro_batch = dsc.micro_batch_size(ds_config)
    tokens = micro_batch * cfg.data.seq_len
    checkpointing = cfg.train.activation_checkpointing
    base_dtype = cfg.relora.base_dtype
    w_bytes = p if base_dtype == "auto" else WEIGHT_BYTES[base_dtype]  # bytes per wrapped weight as held
    plan = Plan(ranks, stage, precision, base_dtype, checkpointing, micro_batch, accelerator)
    foreach = accelerator == "cuda"
    # Offload moves memory off a CUDA device; on the CPU accelerator it is the same memory (and not counted apart).
    offload_optimizer, offload_param = dsc.offloaded(ds_config) if accelerator == "cuda" else (False, False)
    heap_returns = returns_freed_host_memory(stage, method.stores_weight, accelerator == "cuda")
    heap_keeps = accelerator == "cpu" and not heap_returns  # glibc's heap keeps the pages of small freed tensors
    runtime = RUNTIME_BASELINE if accelerator == "cpu" else 0.0
    held_per_saved = ACTIVATION_HELD_PER_SAVED if accelerator == "cpu" else 1.0
    wrapped = method.switch_step is not None
    rank = cfg.relora.rank if wrapped else 0
    shard = ranks if stage >= 3 else 1
    low_rank_trainable = counts.total - counts.wrapped + counts.adapters  # embeddings, norms, head and the adapters

    build = Components(runtime=runtime)  # the model as built: whole in fp32, partitioned, or stored module by module
    if stage >= 3:
        build.parameters = counts.total * p / ranks
        build.transient = 4 * counts.largest_trainable_full
    elif wrapped and method.switch_step == 0 and (base_dtype != "auto" or p < 4):  # wrap_while_building
        # W stored, or (auto in a bf16 run) the wrapped layer cast to the run's dtype, as each target is initialised
        adapter_bytes = p if base_dtype == "auto" else 4
        build.parameters = (counts.total - counts.wrapped) * 4 + counts.adapters * adapter_bytes
        build.frozen_w = counts.wrapped * w_bytes
        build.transient = 4 * counts.largest
    else:
        build.parameters = counts.total * 4
    plan.phases["build"] = build = _params_offloaded(build) if offload_param else build
    zero = ds_config.get("zero_optimization", {})
    reduce_bucket = float(zero.get("reduce_bucket_size", REDUCE_BUCKET_DEFAULT))
    overlap_comm = bool(zero.get("overlap_comm", stage == 3))  # DeepSpeed's default: on at ZeRO-3 only
    layout = dict(foreach=foreach, offload_optimizer=offload_optimizer, reduce_bucket=reduce_bucket,
                  overlap_comm=overlap_comm, heap_keeps=heap_keeps, touched_only=accelerator == "cpu")
    between = {}  # each steps phase as it stands between two steps: what a checkpoint or a restart runs beside
    if not wrapped or method.switch_step > 0:
        full = Components(runtime=runtime)
        step_temporaries = _states(full, counts.total, counts.largest_trainable_full, p, stage, precision, ranks,
                                   **layout)
        full.activations = activation_bytes(counts, tokens, p, 0, checkpointing, held_per_saved)
        full.transient += zero3_buffers(ds_config, p, counts.total)
        plan.phases["full-rank steps"] = full = _params_offloaded(full) if offload_param else full
        between["full-rank steps"] = _between_steps(full, step_temporaries, stage, heap_returns, accelerator,
                                                    counts.total, p)
    if wrapped:
        frozen = counts.wrapped * w_bytes + (4 * counts.wrapped_rows if base_dtype in ("int8", "fp8") else 0)
        low = Components(frozen_w=frozen / shard, runtime=runtime)
        step_temporaries = _states(low, low_rank_trainable, counts.largest_trainable_low, p, stage, precision, ranks,
                                   **layout)
        low.activations = activation_bytes(counts, tokens, p, rank, checkpointing, held_per_saved)
        low.transient += zero3_buffers(ds_config, p, low_rank_trainable)
        plan.phases["low-rank steps"] = low = _params_offloaded(low) if offload_param else low
        between["low-rank steps"] = _between_steps(low, step_temporaries, stage, heap_returns, accelerator,
                                                   low_rank_trainable, p)
        restart = Components(**between["low-rank steps"].__dict__)
        restart.transient += 3 * 4 * counts.largest  # one layer's merge in fp32
        plan.phases["restart"] = restart
    first = plan.phases.get("full-rank steps") or plan.phases["low-rank steps"]
    first_trainable = counts.total if "full-rank steps" in plan.phases else low_rank_trainable
    steps_trainable = low_rank_trainable if wrapped else counts.total
    engine = engine_made(first, first_trainable, p, stage, precision, ranks, offload_optimizer)
    if stage in (1, 2) and not offload_optimizer and p < 4 and heap_keeps:
        engine.transient += first_trainable * p  # the module's parameters cast one by one, on the heap, then flattened
    model_build = build
    if engine.total > build.total:  # the engine made over it (gradients and Adam's moments come with the first step)
        plan.phases["build"] = build = engine
    steps = plan.phases.get("low-rank steps") or plan.phases["full-rank steps"]
    # A checkpoint runs beside the steps' state between two steps: the low-rank steps' (or a full-rank run's), and
    # with a warm start the full-rank one's too (the switch's reference checkpoint, checkpoint.at_switch; a stop).
    if len(between) == 2:
        plan.phases["full-rank checkpoint"] = between["full-rank steps"]
    plan.phases["checkpoint"] = between["low-rank steps" if wrapped else "full-rank steps"]
    # A new process: the model is built again and the engine made, then the checkpoint is loaded from memory-mapped
    # files (checkpoint.memory_mapped_loads). What is copied out of a mapping is resident twice while it is mapped: the
    # parameters and the fp32 masters, and on ZeRO-3 the rank's shards of W; below ZeRO-3 each wrapped layer's W
    # (stored, or the frozen Parameter) goes through a mapping of its own, one W at a time
    # (engine/checkpoint.copy_stored_weights). Adam's moments stay mapped, untouched, until the first step reads them.
    made = engine_made(steps, steps_trainable, p, stage, precision, ranks, offload_optimizer)
    loaded = Components(**{**made.__dict__, "transient": 0.0})
    one_w_at_a_time = wrapped and stage < 3
    loaded.transient = (loaded.parameters + loaded.masters
                        + (w_bytes * counts.largest if one_w_at_a_time else loaded.frozen_w))
    plan.phases["resume"] = max((model_build, made, loaded), key=lambda c: c.total)
    # The export: one tensor at a time in fp32; an int8/fp8 W is dequantized whole beside its stored form, then merged
    # (s·B·A beside it) and cast for writing.
    largest = max(counts.largest, counts.vocab * counts.hidden)
    copies = 2.75 * 4 * counts.largest if wrapped and base_dtype in ("int8", "fp8") else 0.0
    plan.phases["export"] = Components(transient=max(1.5 * 4 * largest, copies),
                                       runtime=EXPORT_BASELINE if accelerator == "cpu" else 0.0)
    plan.phases = {name: plan.phases[name] for name in PHASES if name in plan.phases}
    return plan


def phase_of(measured: str, wrapped: bool, plan: Plan) -> str | None:
    """The plan's phase for a phase the trainer measures (its `memory` events: build, resume, steps before an event,
    restart, checkpoint; None for the switch and evaluation, which the plan does not model): the steps and a
    checkpoint are the low-rank ones once the module holds adapters (`wrapped`), the full-rank ones before."""
    if measured == "steps":
        name = "low-rank steps" if wrapped else "full-rank steps"
    elif measured == "checkpoint":
        name = "checkpoint" if wrapped or "full-rank checkpoint" not in plan.phases else "full-rank checkpoint"
    else:
        name = measured
    return name if name in plan.phases else None


def rank_device_bytes(device) -> int | None:
    """The memory one rank has: a CUDA device's total; on CPU ranks, the host's available memory (MemAvailable)
    shared by this node's ranks (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from the deepspeed launcher). None where
    unknown."""
    import os
    import re

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            available = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))


CHANGES = ("reduce bucket", "activation checkpointing", "micro-batch", "base_dtype", "stage", "offload (CUDA)",
           "ranks")
# The reduce bucket the cheapest fix tries on ZeRO-1/2 (elements): a tenth of DeepSpeed's default, still far above
# the all-reduce sizes that keep a link busy.
SMALL_REDUCE_BUCKET = 5 * 10**7


def cheapest_fit(cfg, ds_config: dict, ranks: int, vocab_size: int, device_bytes: float, counts: Counts,
                 accelerator: str = "cpu"):
    """(what to change, its plan) for the first change that fits `device_bytes`, tried in order of what it costs:
    on ZeRO-1/2 a smaller reduce bucket (DeepSpeed allocates it whole: 5e8 elements by default), activation
    checkpointing selective, then full (a recompute), a smaller micro-batch (utilisation), relora.base_dtype int8 (a
    rounding of W, low-rank methods on ZeRO-0/1/2), the next ZeRO stage (communication), on a CUDA device the
    optimizer offloaded to CPU memory, then the parameters too (ZeRO-3; PCIe traffic each step), more ranks (hardware,
    up to 1024). None when nothing does."""
    import copy

    from relora_ds import methods

    def fits(c, d, n):
        plan = make_plan(c, d, n, vocab_size, counts, accelerator)
        return plan if plan.peak <= device_bytes else None

    stage = dsc.zero_stage(ds_config)
    zero = ds_config.get("zero_optimization", {})
    if stage in (1, 2) and float(zero.get("reduce_bucket_size", REDUCE_BUCKET_DEFAULT)) > SMALL_REDUCE_BUCKET:
        d = {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": SMALL_REDUCE_BUCKET}}
        if (plan := fits(cfg, d, ranks)):
            return f"zero_optimization.reduce_bucket_size: {SMALL_REDUCE_BUCKET}", plan
    modes = {"none": ("selective", "full"), "selective": ("full",)}.get(cfg.train.activation_checkpointing, ())
    for mode in modes:  # selective recomputes the MLPs only: cheaper than full
        c = copy.deepcopy(cfg)
        c.train.activation_checkpointing = mode
        if (plan := fits(c, ds_config, ranks)):
            return f"train.activation_checkpointing: {mode}", plan
    micro = dsc.micro_batch_size(ds_config)
    while micro > 1:
        micro //= 2
        d = {**ds_config, "train_micro_batch_size_per_gpu": micro}
        if (plan := fits(cfg, d, ranks)):
            return f"train_micro_batch_size_per_gpu: {micro} (more gradient accumulation steps)", plan
    wraps = methods.from_config(cfg).switch_step is not None
    if cfg.relora.base_dtype in ("auto", "fp32", "bf16") and stage <= 2 and wraps:
        c = copy.deepcopy(cfg)
        c.relora.base_dtype = "int8"
        if (plan := fits(c, ds_config, ranks)):
            return "relora.base_dtype: int8", plan
    for next_stage in range(stage + 1, 4):
        d = {**ds_config, "zero_optimization": {**ds_config.get("zero_optimization", {}), "stage": next_stage}}
        c = cfg
        if next_stage == 3 and cfg.relora.base_dtype != "auto":
            c = copy.deepcopy(cfg)
            c.relora.base_dtype = "auto"
        if (plan := fits(c, d, ranks)):
            return f"zero_optimization.stage: {next_stage}" + (" (with relora.base_dtype auto)" if c is not cfg
                                                                else ""), plan
    if accelerator == "cuda":  # offload: the host's memory for the device's, at the cost of PCIe traffic
        zero = {**ds_config.get("zero_optimization", {}), "stage": max(stage, 2),
                "offload_optimizer": {"device": "cpu"}}
        if (plan := fits(cfg, {**ds_config, "zero_optimization": zero}, ranks)):
            return (f"zero_optimization.offload_optimizer.device: cpu"
                    + (" (with zero_optimization.stage: 2)" if stage < 2 else "")), plan
        c = cfg
        if cfg.relora.base_dtype != "auto":
            c = copy.deepcopy(cfg)
            c.relora.base_dtype = "auto"
        zero = {**zero, "stage": 3, "offload_param": {"device": "cpu"}}
        if (plan := fits(c, {**ds_config, "zero_optimization": zero}, ranks)):
            return ("zero_optimization.offload_optimizer and offload_param.device: cpu (with zero_optimization.stage: "
                    "3" + (", relora.base_dtype auto" if c is not cfg else "") + ")"), plan
    n = ranks
    while n < 1024:
        n *= 2
        if stage >= 1 and (plan := fits(cfg, ds_config, n)):
            return f"{n} ranks", plan
    return None


def render(plan: Plan, device_bytes: float | None = None, fix=None) -> str:
    """The plan as a table (GiB per rank), and the verdict against `device_bytes`."""
    columns = ("parameters", "frozen_w", "gradients", "masters", "moments", "activations", "transient", "runtime")
    host = any(c.host for c in plan.phases.values())
    lines = [f"per-rank memory, GiB: {plan.ranks} rank{'s' * (plan.ranks > 1)} of {plan.accelerator}, ZeRO-{plan.stage} "
             f"{plan.precision}, base_dtype {plan.base_dtype}, activation checkpointing {plan.checkpointing}, "
             f"micro-batch {plan.micro_batch}", "",
             "| phase | " + " | ".join(c.replace("_", " ") for c in columns) + " | total |"
             + (" host (offloaded) |" if host else ""),
             "|---|" + "---|" * (len(columns) + 1 + host)]
    for name, c in plan.phases.items():
        lines.append(f"| {name} | " + " | ".join(f"{getattr(c, k) / GIB:.2f}" for k in columns)
                     + f" | **{c.total / GIB:.2f}** |" + (f" {c.host / GIB:.2f} |" if host else ""))
    lines.append("")
    if plan.accelerator == "cuda":
        lines.append("runtime: the CUDA context and the caching allocator's slack are not counted (not measured yet)")
    if host:
        lines.append("host (offloaded): CPU memory per rank that zero_optimization.offload_* takes off the device; not in "
                     "the total, and not measured yet")
    if device_bytes is not None:
        if plan.peak <= device_bytes:
            lines.append(f"fits: peak {plan.peak / GIB:.2f} GiB of {device_bytes / GIB:.2f} GiB")
        elif fix is None:
            lines.append(f"does not fit: peak {plan.peak / GIB:.2f} GiB of {device_bytes / GIB:.2f} GiB; no single "
                         f"change tried makes it fit ({', '.join(CHANGES)})")
        else:
            change, fixed = fix
            lines.append(f"does not fit: peak {plan.peak / GIB:.2f} GiB of {device_bytes / GIB:.2f} GiB; cheapest "
                         f"change that fits: {change} (peak {fixed.peak / GIB:.2f} GiB)")
    return "\n".join(lines) + "\n"

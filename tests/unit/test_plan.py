"""relora-ds plan: the per-rank terms follow the stage, precision, base_dtype and checkpointing as documented; the
cheapest fix is the first that fits; bad sizes are one line. (How close it comes to measured peaks is a benchmark:
benchmarks/plan_check.py.)"""

import copy

import pytest

from relora_ds import cli
from relora_ds.config import RunConfig
from relora_ds.memory import GIB
from relora_ds import plan as planner

VOCAB = 8192


def _cfg(**relora):
    return RunConfig.from_dict({"method": "relora", "model": {"preset": "350m"},
                                "relora": {"rank": 64, "warm_start_steps": 0, "reset_every": 2, **relora},
                                "schedule": {"warmup_steps": 1, "restart_warmup_steps": 1},
                                "data": {"seq_len": 512}, "train": {"total_steps": 10}})


def _ds(stage=2, bf16=True, micro=8):
    return {"train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}


@pytest.fixture(scope="module")
def counts():
    return planner.model_counts(_cfg(), VOCAB)


def test_counts_are_the_models(counts):
    from relora_ds.model.build import preset_meta_model
    from relora_ds.model.counts import param_count

    model = preset_meta_model("350m", VOCAB)
    assert counts.total == param_count(model)
    assert counts.total - counts.wrapped + counts.adapters == param_count(model, relora_rank=64, trainable_only=True)
    assert counts.layers == 24 and counts.hidden == 1024 and counts.vocab == VOCAB


def test_terms_follow_the_stage_and_precision(counts):
    t = counts.total - counts.wrapped + counts.adapters
    z0 = planner.make_plan(_cfg(), _ds(0, bf16=False), 1, VOCAB, counts).phases["low-rank steps"]
    assert (z0.parameters, z0.frozen_w, z0.gradients, z0.masters, z0.moments) == (4 * t, 4 * counts.wrapped, 4 * t, 0,
                                                                                 8 * t)
    z2 = planner.make_plan(_cfg(), _ds(2), 2, VOCAB, counts).phases["low-rank steps"]
    assert z2.parameters == 2 * t and z2.frozen_w == 2 * counts.wrapped  # replicated below ZeRO-3
    assert z2.masters == 4 * t / 2 and z2.moments == 8 * t / 2
    # a CPU rank: of DeepSpeed's default bucket (5e8 elements) only the part the model's gradients fill is resident,
    # so the step holds the peak: the fp32 gradient partition and AdamW's two temporaries of it
    assert (z2.gradients, z2.transient) == (4 * t / 2, 2 * 4 * t / 2)
    z2 = planner.make_plan(_cfg(), _ds(2), 2, VOCAB, counts, "cuda").phases["low-rank steps"]
    # a CUDA device counts the bucket's whole allocation: the backward holds the peak, the bucket, the rank's gradient
    # partition, and half the filled bucket (the whole model) while it is reduce-scattered
    assert (z2.gradients, z2.transient) == (2 * 5e8 + 2 * t / 2 + 0.5 * 2 * t, 0)
    overlap = _ds(2)
    overlap["zero_optimization"]["overlap_comm"] = True
    assert planner.make_plan(_cfg(), overlap, 2, VOCAB, counts, "cuda").phases["low-rank steps"].gradients == \
        2 * 2 * 5e8 + 2 * t / 2 + 0.5 * 2 * t  # two buckets
    z1 = _ds(1)
    z1["zero_optimization"]["reduce_bucket_size"] = 10**6
    cpu = planner.make_plan(_cfg(), z1, 2, VOCAB, counts).phases["low-rank steps"]
    stored = planner.make_plan(_cfg(base_dtype="bf16"), z1, 2, VOCAB, counts).phases["low-rank steps"]
    # ZeRO-1 on a CPU rank whose heap keeps what it frees: the module's gradients, freed into the bucket, stay resident
    # through the step; with a stored W the trainer has freed memory returned at once
    assert (cpu.gradients, stored.gradients) == (4 * t / 2 + 2 * t, 4 * t / 2)
    z3 = planner.make_plan(_cfg(), _ds(3), 4, VOCAB, counts).phases["low-rank steps"]
    assert z3.parameters == 2 * t / 4 and z3.frozen_w == 2 * counts.wrapped / 4 and z3.masters == 4 * t / 4


def test_int8_stores_w_in_one_byte_and_its_scales(counts):
    auto = planner.make_plan(_cfg(), _ds(2), 1, VOCAB, counts)
    int8 = planner.make_plan(_cfg(base_dtype="int8"), _ds(2), 1, VOCAB, counts)
    assert int8.phases["low-rank steps"].frozen_w == counts.wrapped + 4 * counts.wrapped_rows
    assert auto.phases["low-rank steps"].frozen_w - int8.phases["low-rank steps"].frozen_w == \
        counts.wrapped - 4 * counts.wrapped_rows
    assert int8.phases["build"].total < auto.phases["build"].total  # no fp32 model built first


def test_the_build_holds_w_as_the_run_stores_it(counts):
    """Wrapped at step 0 on ZeRO-0/1/2, each target is stored (bf16, int8) or, with auto in a bf16 run, cast as it is
    built: the build peaks where the bf16-stored one does (the engine made over it), far below the whole fp32 model
    that auto in an fp32 run, or a full-rank start, builds. (On a CUDA device: a CPU rank whose W is not stored keeps
    the heap pages of the cast parameters DeepSpeed flattens, a term of the process, not of W.)"""
    auto = planner.make_plan(_cfg(), _ds(2), 1, VOCAB, counts, "cuda").phases["build"]
    stored = planner.make_plan(_cfg(base_dtype="bf16"), _ds(2), 1, VOCAB, counts, "cuda").phases["build"]
    assert auto.total <= stored.total and auto.frozen_w == stored.frozen_w == 2 * counts.wrapped
    assert auto.total - auto.runtime < 4 * counts.total
    for fp32_model in (planner.make_plan(_cfg(), _ds(2, bf16=False), 1, VOCAB, counts),
                       planner.make_plan(_cfg(warm_start_steps=4), _ds(2), 1, VOCAB, counts)):
        build = fp32_model.phases["build"]
        assert build.total - build.runtime >= 4 * counts.total


def test_a_resume_holds_the_engine_and_the_mapped_pages_it_copies(counts):
    """The resume's engine has no moments yet (they stay mapped until the first step) and, below ZeRO-3, no gradients;
    it holds the pages of what it copies out of the mapped checkpoint besides: parameters, masters, and on ZeRO-3 the
    shards of W (below ZeRO-3 each W has a mapping of its own: one at a time, stored or a Parameter)."""
    t = counts.total - counts.wrapped + counts.adapters
    auto = planner.make_plan(_cfg(), _ds(2), 2, VOCAB, counts).phases["resume"]
    assert (auto.gradients, auto.moments, auto.activations) == (0, 0, 0)
    assert auto.transient == 2 * t + 4 * t / 2 + 2 * counts.largest
    int8 = planner.make_plan(_cfg(base_dtype="int8"), _ds(2), 2, VOCAB, counts).phases["resume"]
    assert int8.transient == 2 * t + 4 * t / 2 + counts.largest
    z3 = planner.make_plan(_cfg(), _ds(3), 4, VOCAB, counts).phases["resume"]
    assert z3.gradients == 2 * t / 4 and z3.transient == (2 * t + 4 * t + 2 * counts.wrapped) / 4
    # BF16_Optimizer steps once over zero gradients as it is made: its fp32 accumulators, the module's gradients, and
    # Adam's moments are there before the checkpoint is read
    z0 = planner.make_plan(_cfg(), _ds(0), 1, VOCAB, counts).phases["resume"]
    assert (z0.gradients, z0.moments) == (4 * t + 2 * t, 8 * t)


def test_checkpointing_keeps_one_layer_and_the_layer_inputs(counts):
    none = planner.activation_bytes(counts, 4096, 2, 64, "none")
    full = planner.activation_bytes(counts, 4096, 2, 64, "full")
    per_layer = 2 * (6 * 1024 + 4 * counts.intermediate + 7 * 64) + 16 * 1024
    assert none == 4096 * (24 * per_layer + 12 * VOCAB)
    assert full == 4096 * (24 * 2 * 1024 + per_layer + 12 * VOCAB)
    assert planner.activation_bytes(counts, 4096, 2, 64, "none", 1.5) == 4096 * (1.5 * 24 * per_layer + 12 * VOCAB)


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_the_layer_term_is_what_autograd_saves(checkpointing):
    """layer_activation_bytes against the tensors autograd saves in one decoder layer of a wrapped model (fp32, r 8),
    parameters left out; selective: without the MLP's own."""
    import torch

    from relora_ds.model.build import build_model, enable_activation_checkpointing
    from relora_ds.model.families import target_modules_of
    from relora_ds.relora.wrap import wrap

    torch.manual_seed(0)
    model = build_model("tiny", 512, max_position_embeddings=64)
    wrap(model, rank=8, alpha=16, target_modules=target_modules_of(model, None))
    if checkpointing != "none":
        enable_activation_checkpointing(model, checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, saved = [False], {}
    layers = model.model.layers
    layers[1].register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
    layers[1].register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if inside[0] and key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    tokens = 2 * 64
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 512, (2, 64)), labels=torch.randint(0, 512, (2, 64)))
    counts = planner.model_counts(RunConfig.from_dict({"model": {"preset": "tiny"}, "relora": {"rank": 8}}), 512)
    expected = planner.layer_activation_bytes(counts, 4, 8)
    if checkpointing == "selective":
        expected -= 4 * (4 * counts.intermediate + 3 * 8)
    assert sum(saved.values()) / tokens == pytest.approx(expected, rel=0.04)


def test_the_cheapest_fix_is_the_first_that_fits(counts):
    cfg, ds = _cfg(), _ds(2)
    plain = planner.make_plan(cfg, ds, 1, VOCAB, counts).peak
    cfg_ckpt = _cfg()
    cfg_ckpt.train.activation_checkpointing = "full"
    checkpointed = planner.make_plan(cfg_ckpt, ds, 1, VOCAB, counts).peak
    assert checkpointed < plain
    cfg_selective = _cfg()
    cfg_selective.train.activation_checkpointing = "selective"
    selective = planner.make_plan(cfg_selective, ds, 1, VOCAB, counts).peak
    assert checkpointed < selective < plain
    change, fixed = planner.cheapest_fit(cfg, ds, 1, VOCAB, (plain + selective) / 2, counts)
    assert change == "train.activation_checkpointing: selective" and fixed.peak == selective
    change, fixed = planner.cheapest_fit(cfg, ds, 1, VOCAB, (selective + checkpointed) / 2, counts)
    assert change == "train.activation_checkpointing: full" and fixed.peak == checkpointed
    short, int8_short = _cfg(), _cfg(base_dtype="int8")  # short sequences: W, not activations, is what to shrink
    short.data.seq_len = int8_short.data.seq_len = 64
    ds = _ds(2, micro=1)
    plain = planner.make_plan(short, ds, 1, VOCAB, counts, "cuda").peak
    ds["zero_optimization"]["reduce_bucket_size"] = planner.SMALL_REDUCE_BUCKET
    small_bucket = planner.make_plan(short, ds, 1, VOCAB, counts, "cuda").peak
    int8 = planner.make_plan(int8_short, ds, 1, VOCAB, counts, "cuda").peak
    assert int8 < small_bucket < plain
    change, fixed = planner.cheapest_fit(short, _ds(2, micro=1), 1, VOCAB, (small_bucket + plain) / 2, counts, "cuda")
    assert change == f"zero_optimization.reduce_bucket_size: {planner.SMALL_REDUCE_BUCKET}"
    assert fixed.peak == small_bucket  # DeepSpeed's default bucket (5e8 elements, allocated whole): the first lever
    change, fixed = planner.cheapest_fit(short, ds, 1, VOCAB, (int8 + small_bucket) / 2, counts, "cuda")
    assert change == "relora.base_dtype: int8" and fixed.peak == int8
    assert planner.cheapest_fit(cfg, ds, 1, VOCAB, 0.1 * GIB, counts) is None  # below the runtime: nothing fits


def _offload(ds, optimizer=True, param=False):
    zero = {**ds["zero_optimization"], **({"offload_optimizer": {"device": "cpu"}} if optimizer else {}),
            **({"offload_param": {"device": "cpu"}} if param else {})}
    return {**ds, "zero_optimization": zero}


def test_offload_moves_the_optimizer_and_parameters_to_the_host_on_cuda(counts):
    t = counts.total - counts.wrapped + counts.adapters
    plain = planner.make_plan(_cfg(), _ds(2), 1, VOCAB, counts, "cuda").phases["low-rank steps"]
    off = planner.make_plan(_cfg(), _offload(_ds(2)), 1, VOCAB, counts, "cuda").phases["low-rank steps"]
    # masters 4t, moments 8t and the fp32 gradient partition 4t on the host; the bf16 partition (2t) leaves the
    # device, and the step runs on the host (no temporaries on the device)
    assert (off.masters, off.moments, off.host) == (0, 0, 16 * t)
    assert off.gradients == plain.gradients - 2 * t and off.transient == 0
    assert off.parameters == plain.parameters and off.frozen_w == plain.frozen_w
    cpu_plain = planner.make_plan(_cfg(), _ds(2), 1, VOCAB, counts, "cpu")
    cpu_off = planner.make_plan(_cfg(), _offload(_ds(2)), 1, VOCAB, counts, "cpu")
    assert cpu_off.phases == cpu_plain.phases  # the CPU accelerator's host is its device: nothing moves
    z3 = planner.make_plan(_cfg(), _offload(_ds(3), param=True), 2, VOCAB, counts, "cuda").phases["low-rank steps"]
    assert (z3.parameters, z3.frozen_w) == (0, 0)
    assert z3.host == 2 * t / 2 + 2 * counts.wrapped / 2 + (4 + 8 + 4) * t / 2  # partitions, W's too, and the optimizer


def test_on_one_gpu_the_cheapest_fix_may_be_offload(counts):
    short = _cfg()
    short.data.seq_len = 64
    short.train.activation_checkpointing = "full"
    ds = _ds(2, micro=1)
    ds["zero_optimization"]["reduce_bucket_size"] = 2 * 10**7  # a bucket sized for one GPU: not the lever
    plain = planner.make_plan(short, ds, 1, VOCAB, counts, "cuda").peak
    offloaded = planner.make_plan(short, _offload(ds), 1, VOCAB, counts, "cuda").peak
    int8_short = copy.deepcopy(short)
    int8_short.relora.base_dtype = "int8"
    int8 = planner.make_plan(int8_short, ds, 1, VOCAB, counts, "cuda").peak
    budget = (plain + offloaded) / 2
    assert offloaded < budget < plain and int8 > budget  # int8 W, tried before, does not fit; offload does
    change, fixed = planner.cheapest_fit(short, ds, 1, VOCAB, budget, counts, "cuda")
    assert change == "zero_optimization.offload_optimizer.device: cpu" and fixed.peak == offloaded
    assert "host (offloaded)" in planner.render(fixed, budget)
    on_cpu = planner.cheapest_fit(short, ds, 1, VOCAB, budget, counts, "cpu")
    assert on_cpu is None or "offload" not in on_cpu[0]  # the CPU accelerator's host is its device


def _run(tmp_path, capsys, *args):
    config = tmp_path / "run.yaml"
    config.write_text("method: relora\nmodel: {preset: tiny}\nrelora: {rank: 4, warm_start_steps: 0, reset_every: 2}\n"
                      "schedule: {warmup_steps: 1, restart_warmup_steps: 1}\ntrain: {total_steps: 4}\n")
    code = cli.main(["plan", "--config", str(config), "--deepspeed_config", "ds_configs/cpu_zero2.json", *args])
    return code, capsys.readouterr()


def test_the_command_prints_every_phase_and_the_verdict(tmp_path, capsys):
    code, out = _run(tmp_path, capsys, "--ranks", "2", "--device-memory", "24GiB", "--accelerator", "cpu")
    assert code == 0
    for phase in ("build", "low-rank steps", "restart", "checkpoint", "resume", "export"):
        assert f"| {phase} |" in out.out
    assert "fits: peak" in out.out and "2 ranks of cpu, ZeRO-2" in out.out
    code, out = _run(tmp_path, capsys, "--device-memory", "100MB", "--accelerator", "cpu")
    assert code == 0 and "does not fit: peak" in out.out


@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "error: --ranks must be >= 1, got 0"),
    (["--device-memory", "lots"], "error: --device-memory 'lots': not a size (e.g. 24GiB, 80GB)"),
    (["--set", "relora.base_dtype=int8", "--deepspeed_config", "ds_configs/cpu_zero3.json"],
     "error: relora.base_dtype int8: needs zero_optimization.stage 0, 1 or 2, got 3"),
])
def test_impossible_sizes_are_one_line(tmp_path, capsys, args, message):
    code, out = _run(tmp_path, capsys, *args)
    assert code == 2
    assert out.err.startswith(message) and out.err.count("\n") == 1

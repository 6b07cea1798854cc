"""Short real runs of the trainer in this process (world size 1, DeepSpeed on the CPU)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from relora_ds import trainer
from relora_ds.errors import RunError
from relora_ds.engine import checkpoint
from tests.helpers.runs import cpu_env, ds_config, read_metrics, tiny_run_config, write_corpus, write_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    train_file, val_file = write_corpus(directory)
    return directory, train_file, val_file


def run(cfg):
    return trainer.train(cfg)


def test_relora_run_switches_restarts_logs_and_exports(corpus, tmp_path):
    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path))
    summary = trainer.train(cfg, keep_engine=True)  # the trained model, for the export's logits
    out = cfg.train.output_dir
    records = read_metrics(out)
    events = [(r["event"], r["step"]) for r in records if "event" in r and r["event"] != "checkpoint"]
    assert ("switch", 4) in events
    assert [s for e, s in events if e == "restart"] == [8, 12]
    restarts = [r for r in records if r.get("event") == "restart"]
    assert all(abs(r["fraction_zeroed"] - 0.99) < 0.01 for r in restarts)
    assert all(r["merged_norm"] > 0 for r in restarts)
    assert all(r["merge_error"] < 1e-6 and abs(r["merge_kept"] - 1) < 1e-6 and "drift" not in r for r in restarts)
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all({"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s"} <= set(r) for r in steps)
    assert all(0 < r["grad_norm"] < float("inf") for r in steps)
    assert not any("mfu" in r for r in steps)  # CPU, fp32, no log.peak_tflops: no peak, no MFU key
    assert steps[-1]["tokens_seen"] == 16 * 2 * 32
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["loss"] < evals[0]["loss"]
    for name in ("config.yaml", "ds_config.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert summary["checkpoint"].endswith("step_00000016")

    # Export: a plain HF model with the trained model's logits; generate works.
    from transformers import AutoModelForCausalLM

    from relora_ds.tools.export import export

    export_dir = export(out, str(tmp_path / "export"))
    hf = AutoModelForCausalLM.from_pretrained(export_dir)
    assert not any("lora" in n for n, _ in hf.named_parameters())
    engine_model = summary["engine"].module
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        engine_model.eval()
        expected = engine_model(input_ids=x).logits
        got = hf(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    generated = hf.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    assert os.path.isfile(os.path.join(export_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(export_dir, "tokenizer.json"))
    summary["engine"].destroy()


def test_logged_grad_norm_is_the_norm_of_the_step_gradients(corpus, tmp_path):
    """ZeRO-0 fp32 in one process (the norm DeepSpeed does not compute): step 1's logged grad_norm equals the
    norm of the gradients of the trainer's model on the trainer's first batch, computed by hand (before clipping:
    the ds_config clips at 1.0). With log.peak_tflops set, the CPU run logs MFU from it."""
    from relora_ds.data import loader as data_loader
    from relora_ds.data.tokenize import load_tokenizer
    from relora_ds.model.build import model_from_config
    from relora_ds.model.counts import flops_per_token

    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), **{
        "method": "full", "relora.warm_start_steps": 0, "train.total_steps": 3, "train.eval_every": 0,
        "checkpoint.save_final": False, "log.peak_tflops": 0.5})
    run(cfg)
    steps = [r for r in read_metrics(cfg.train.output_dir) if "event" not in r]

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_set = data_loader.dataset_from_config(cfg.data, tokenizer, split="train",
                                                cache_dir=os.path.join(cfg.train.output_dir, "cache"))
    batch = next(iter(data_loader.DistributedBatches(train_set, micro_batch_size=2, rank=0, world_size=1,
                                                     seed=cfg.train.seed)))
    model = model_from_config(cfg.model, len(tokenizer), seed=cfg.train.seed)
    loss = model(**batch).loss
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])).item()
    assert steps[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)  # the same model and batch
    assert expected > 1.0  # so the clipping at 1.0 would show
    assert steps[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)

    full = flops_per_token(model, cfg.data.seq_len)["full"]
    for record in steps:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * full / 0.5e12, rel=1e-9)


@pytest.mark.parametrize("stage, bf16", [(0, False), (0, True), (1, False), (2, True), (3, False), (3, True)])
def test_step_with_grad_norm_on_every_stage(stage, bf16):
    """runtime.step_with_grad_norm in one process with 2 accumulated micro-batches, against the norm of the
    mean gradient computed by hand: ZeRO-0 fp32 computes it itself, the other stages read DeepSpeed's (ZeRO-3's
    over partitioned gradients); bf16 within bf16's rounding."""
    from relora_ds.engine import runtime
    from tests.helpers.tiny import fixed_batch, tiny_model

    runtime.init_distributed()
    model = tiny_model(seed=0)
    for seed in (0, 1):
        ids = fixed_batch(4, 32, seed=seed)
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])).item()
    config = ds_config(stage, micro_batch=4, bf16=bf16, adamw={"lr": 1e-3, "torch_adam": True},
                       gradient_accumulation_steps=2)
    engine = runtime.make_engine(tiny_model(seed=0), config)
    try:
        for seed in (0, 1):
            ids = fixed_batch(4, 32, seed=seed)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            norm = runtime.step_with_grad_norm(engine) if seed == 1 else engine.step()
    finally:
        engine.destroy()
    assert norm == pytest.approx(expected, rel=1e-2 if bf16 else 1e-6)


def test_mfu_inputs_peak_and_model_flops():
    """The peak: log.peak_tflops, else the bf16 table by GPU name; none on CPU or fp32. The FLOPs: those of the
    model the run's transformers config builds (preset, GQA init_from alike); none for a config without a model."""
    from types import SimpleNamespace

    from relora_ds import hardware
    from relora_ds.config import load_config
    from relora_ds.model.build import preset_config, preset_meta_model
    from relora_ds.model.counts import flops_per_token

    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert hardware.peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert hardware.peak_tflops("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert hardware.peak_tflops("Tesla V100") is None and hardware.peak_tflops(None) is None

    bf16, fp32 = {"bf16": {"enabled": True}}, {"bf16": {"enabled": False}}
    cfg = load_config(None, ["data.seq_len=128"])
    assert trainer.peak_flops_per_device(cfg, bf16, "cpu") is None
    assert trainer.peak_flops_per_device(cfg, fp32, "cpu") is None
    cfg.log.peak_tflops = 2.5
    assert trainer.peak_flops_per_device(cfg, fp32, "cpu") == 2.5e12

    expected = flops_per_token(preset_meta_model("20m", 1000), 128)["full"]
    cfg.model.preset = "20m"
    assert trainer.flops_per_token_full(cfg, preset_config("20m", 1000)) == expected
    cfg.model.init_from = "some/exported/model"  # its config, not model.preset, decides
    assert trainer.flops_per_token_full(cfg, preset_config("20m", 1000, max_position_embeddings=512)) == expected
    other = preset_config("20m", 1000)
    other.num_key_value_heads = 2  # GQA: k and v shrink to 2 of the 4 heads, the attention scores do not
    d = other.hidden_size
    assert trainer.flops_per_token_full(cfg, other) == expected - 6 * 4 * 2 * (d * d // 2)
    assert trainer.flops_per_token_full(cfg, preset_config("20m", 1000, "gpt_neox")) == \
        flops_per_token(preset_meta_model("20m", 1000, "gpt_neox"), 128)["full"]
    assert trainer.flops_per_token_full(cfg, SimpleNamespace(model_type="gpt2", vocab_size=1000)) is None


def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    """Checkpoint every step; resuming from before the switch, mid-cycle and right after a restart
    gives the same next losses as the run that went on."""
    _, train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **{"checkpoint.every": 1, "train.eval_every": 0})
    reference = run(cfg)["losses"]
    ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
    assert len(checkpoint.complete_tags(ckpt_dir)) == 16
    for k in (3, 6, 9):  # before the switch at 4; mid-cycle; right after the restart at 8
        resumed_dir = tmp_path / f"resume{k}"
        shutil.copytree(os.path.join(ckpt_dir, checkpoint.tag_for(k)),
                        resumed_dir / "checkpoints" / checkpoint.tag_for(k))
        resumed_cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **{
            "train.output_dir": str(resumed_dir), "train.resume": True, "train.eval_every": 0})
        losses = run(resumed_cfg)["losses"]
        assert sorted(losses) == list(range(k + 1, 17))
        for step, loss in losses.items():
            assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), (k, step)


def test_torn_checkpoint_is_never_resumed(corpus, tmp_path):
    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path),
                          **{"train.total_steps": 6, "relora.warm_start_steps": 0, "checkpoint.every": 3,
                             "checkpoint.keep_last": 2, "train.eval_every": 0})
    run(cfg)
    ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
    # Simulate a save killed mid-write: files present, no COMPLETE marker.
    torn = os.path.join(ckpt_dir, checkpoint.tag_for(9))
    shutil.copytree(os.path.join(ckpt_dir, checkpoint.tag_for(6)), torn)
    os.remove(os.path.join(torn, checkpoint.COMPLETE))
    assert checkpoint.find_checkpoint(cfg.train.output_dir).endswith(checkpoint.tag_for(6))


def test_resume_auto_starts_fresh_then_continues(corpus, tmp_path):
    """The same command twice with train.resume=auto (a requeued job): the first attempt finds only the
    leftovers of an attempt killed before its first complete checkpoint and trains from step 0 with a clean
    metrics.jsonl; the second, with a larger train.total_steps, continues from the first one's checkpoint."""
    import json

    _, train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    out = tmp_path / "run"
    torn = out / "checkpoints" / checkpoint.tag_for(3)
    torn.mkdir(parents=True)  # killed mid-save: no COMPLETE
    (out / "config.yaml").write_text("train: {total_steps: 6}\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)))

    def attempt(total_steps):
        return run(tiny_run_config(tmp_path, train_file, val_file, ds, **{
            "train.resume": "auto", "train.total_steps": total_steps, "train.eval_every": 0,
            "schedule.switch_warmup_steps": 1,  # 6 steps, the switch at 4: room for a warm-up of 1 after it
            "train.output_dir": str(out)}))

    first = attempt(6)
    records = read_metrics(out)
    assert not [r for r in records if r.get("event") == "resume"]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 7))
    assert all(r["loss"] != 99.0 for r in records if "loss" in r)  # no stale step of the dead attempt
    assert len(read_metrics(out / "previous_attempts" / "001")) == 3
    assert first["checkpoint"].endswith(checkpoint.tag_for(6)) and not torn.exists()  # the save removed it

    second = attempt(10)
    assert sorted(second["losses"]) == list(range(7, 11))
    records = read_metrics(out)
    assert [(r["event"], r["step"]) for r in records if r.get("event") in ("resume", "switch", "restart")] == [
        ("switch", 4), ("resume", 6), ("restart", 8)]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == list(range(1, 11))  # continued at 7, nothing written twice
    assert [r["loss"] for r in records if "event" not in r][6:] == [second["losses"][s] for s in range(7, 11)]
    assert second["checkpoint"].endswith(checkpoint.tag_for(10))
    assert os.listdir(out / "previous_attempts") == ["001"]

    # Requeued once more after it finished: the complete final checkpoint is kept as it is, never removed to
    # be rewritten (a kill during a rewrite would lose it), and no step is trained or logged again.
    final = out / "checkpoints" / checkpoint.tag_for(10)
    before = {p.name: os.stat(p).st_ino for p in final.iterdir()}
    third = attempt(10)
    assert third["losses"] == {} and third["checkpoint"] == second["checkpoint"]
    assert {p.name: os.stat(p).st_ino for p in final.iterdir()} == before
    assert [r["step"] for r in read_metrics(out) if "event" not in r] == list(range(1, 11))


def test_output_dir_holding_another_run_is_refused(corpus, tmp_path):
    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path))
    os.makedirs(cfg.train.output_dir)
    open(os.path.join(cfg.train.output_dir, "config.yaml"), "w").write("x: 1\n")
    with pytest.raises(RunError, match="holds another run"):
        trainer.train(cfg)


def test_relora_from_a_saved_full_rank_checkpoint_and_keep_last(corpus, tmp_path, capsys):
    """A full-rank run's step-4 checkpoint starts ReLoRA: step count, data position and schedule carry on, the
    switch happens at 4, restarts at 8 and 12, and the losses equal a run that switched in place at step 4;
    `relora-ds eval` reads the result. keep_last keeps the newest checkpoints only."""
    _, train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    full = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "method": "full", "relora.warm_start_steps": 0, "checkpoint.every": 4,
        "checkpoint.keep_last": 3, "train.eval_every": 0, "train.output_dir": str(tmp_path / "full")})
    run(full)
    ckpt_dir = os.path.join(full.train.output_dir, "checkpoints")
    assert checkpoint.complete_tags(ckpt_dir) == [checkpoint.tag_for(s) for s in (8, 12, 16)]
    # A checkpoint whose step disagrees with relora.warm_start_steps is refused.
    with pytest.raises(RunError, match="relora.warm_start_steps 4 disagrees with the warm-start checkpoint's step 8"):
        trainer.train(tiny_run_config(tmp_path, train_file, val_file, ds, **{
            "relora.warm_start_checkpoint": os.path.join(ckpt_dir, checkpoint.tag_for(8)), "train.output_dir": str(tmp_path / "bad")}))

    full4 = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "method": "full", "relora.warm_start_steps": 0, "checkpoint.every": 4, "checkpoint.keep_last": 0,
        "train.eval_every": 0, "train.output_dir": str(tmp_path / "full4")})
    run(full4)
    cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "relora.warm_start_steps": 0,
        "relora.warm_start_checkpoint": os.path.join(full4.train.output_dir, "checkpoints", checkpoint.tag_for(4)),
        "train.eval_every": 0, "train.output_dir": str(tmp_path / "relora")})
    summary = run(cfg)
    assert sorted(summary["losses"]) == list(range(5, 17))
    records = read_metrics(cfg.train.output_dir)
    assert [r["step"] for r in records if r.get("event") == "switch"] == [4]
    assert [r["step"] for r in records if r.get("event") == "restart"] == [8, 12]
    assert [r for r in records if "event" not in r][0]["tokens_seen"] == 5 * 2 * 32  # carried on from the checkpoint
    # the same 16 steps in one run (warm start 4 inside the run) give the same losses after the switch
    same = run(tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "train.eval_every": 0, "train.output_dir": str(tmp_path / "inrun")}))
    for step in range(5, 17):
        assert summary["losses"][step] == pytest.approx(same["losses"][step], rel=1e-5), step

    from relora_ds import cli

    assert cli.main(["eval", cfg.train.output_dir, "--source", val_file, "--split", "train", "--seq-len", "32",
                     "--batch-size", "2", "--max-batches", "2"]) == 0
    assert "held-out loss" in capsys.readouterr().out


def test_triton_kernels_in_training_match_the_torch_path(corpus, tmp_path):
    """relora.kernels=triton (the interpreter on CPU) through DeepSpeed gives the torch path's losses,
    across the switch and a restart."""
    _, train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    losses = {}
    for kernels in ("torch", "triton"):
        cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **{
            "relora.kernels": kernels, "relora.warm_start_steps": 2, "relora.reset_every": 2,
            "schedule.warmup_steps": 1, "schedule.restart_warmup_steps": 1, "train.total_steps": 5,
            "train.eval_every": 0, "train.output_dir": str(tmp_path / kernels)})
        summary = run(cfg)
        assert [r["step"] for r in summary["restarts"]] == [4]
        losses[kernels] = summary["losses"]
    for step, loss in losses["torch"].items():
        assert losses["triton"][step] == pytest.approx(loss, rel=1e-4), step


def test_reference_checkpoint_at_the_switch_survives_keep_last(corpus, tmp_path):
    """checkpoint.at_switch (default) saves the full-rank model at the warm-start switch and keep_last never prunes
    it; a full-rank run keeps checkpoint.reference_step instead; at_switch false saves none."""
    _, train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "checkpoint.every": 3, "checkpoint.keep_last": 1, "train.eval_every": 0,
        "train.output_dir": str(tmp_path / "relora")})
    run(cfg)
    ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
    assert checkpoint.complete_tags(ckpt_dir) == [checkpoint.tag_for(4), checkpoint.tag_for(16)]
    reference = checkpoint.reference_checkpoint(cfg.train.output_dir)
    assert reference == os.path.join(ckpt_dir, checkpoint.tag_for(4))
    assert checkpoint.read_state(reference)["wrapped"] is False  # saved before the switch
    events = [r for r in read_metrics(cfg.train.output_dir) if r.get("event") == "checkpoint"]
    assert [r["step"] for r in events if r.get("reference")] == [4]

    full = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "method": "full", "relora.warm_start_steps": 0, "checkpoint.reference_step": 4,
        "checkpoint.keep_last": 1, "checkpoint.every": 5, "train.total_steps": 12, "train.eval_every": 0,
        "train.output_dir": str(tmp_path / "full")})
    run(full)
    assert checkpoint.reference_checkpoint(full.train.output_dir).endswith(checkpoint.tag_for(4))
    assert checkpoint.complete_tags(os.path.join(full.train.output_dir, "checkpoints")) == [
        checkpoint.tag_for(4), checkpoint.tag_for(12)]

    none = tiny_run_config(tmp_path, train_file, val_file, ds, **{
        "checkpoint.at_switch": False, "train.total_steps": 6, "train.eval_every": 0,
        "schedule.switch_warmup_steps": 1, "train.output_dir": str(tmp_path / "none")})
    run(none)
    assert checkpoint.reference_checkpoint(none.train.output_dir) is None
    assert checkpoint.complete_tags(os.path.join(none.train.output_dir, "checkpoints")) == [checkpoint.tag_for(6)]


def test_low_rank_lr_scale_applies_after_the_switch_only(corpus, tmp_path):
    """schedule.low_rank_lr_scale multiplies the LR of the steps with adapters in place, not the warm start's."""
    from relora_ds import methods

    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), **{
        "schedule.low_rank_lr_scale": 1.5, "train.total_steps": 8, "train.eval_every": 0})
    run(cfg)
    multiplier = methods.from_config(cfg.resolved()).lr_lambda
    logged = {r["step"]: r["lr"] for r in read_metrics(cfg.train.output_dir) if "event" not in r}
    for step, lr in logged.items():  # the record of step k holds the LR its update used: step k - 1's
        scale = 1.5 if step - 1 >= cfg.relora.warm_start_steps else 1.0
        assert lr == pytest.approx(cfg.schedule.lr * multiplier(step - 1) * scale), step
    assert any(step - 1 >= 4 and lr > 0 for step, lr in logged.items())


def test_every_run_logs_its_plan_and_checks_it_phase_by_phase(corpus, tmp_path, monkeypatch, capsys):
    """The trainer plans the run before building it (relora_ds/plan.py): a `plan` record with each phase's per-rank
    prediction, and beside each measured phase the plan models its prediction (plan_gib), close to the measured peak
    even for a tiny model, where the runtime is most of it (a term far off, like a bucket counted whole that a CPU
    rank never touches, shows here). The run is a process of its own, as a run is: the peaks are its resident set's.
    A rank with less memory than the plan's peak is warned before the build."""
    _, train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path, stage=2),
                          **{"train.total_steps": 10, "checkpoint.every": 4})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(cfg.to_dict()))
    run = subprocess.run([sys.executable, "-m", "relora_ds", "train", "--config", str(config)], env=cpu_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "warning: relora-ds plan" not in run.stderr
    records = read_metrics(cfg.train.output_dir)
    [plan] = [r for r in records if r.get("event") == "plan"]
    assert set(plan["phases_gib"]) == {"build", "full-rank steps", "full-rank checkpoint", "low-rank steps",
                                       "restart", "checkpoint", "resume", "export"}
    checked = [(r["phase"], r["peak_gib"] / r["plan_gib"]) for r in records
               if r.get("event") == "memory" and "plan_gib" in r]
    assert {phase for phase, _ in checked} == {"build", "steps", "checkpoint", "restart"}
    assert all(0.7 < ratio < 1.3 for _, ratio in checked), checked

    monkeypatch.setattr(trainer, "rank_device_bytes", lambda device: 2**20)
    small = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path, stage=2),
                            **{"train.total_steps": 7, "train.eval_every": 0,
                               "train.output_dir": str(tmp_path / "small")})
    trainer.train(small)
    assert "warning: relora-ds plan puts this run's peak at" in capsys.readouterr().err
    [plan] = [r for r in read_metrics(str(tmp_path / "small")) if r.get("event") == "plan"]
    assert plan["device_gib"] == round(2**20 / 2**30, 3)

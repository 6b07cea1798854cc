import glob
import json
import os

import pytest

from relora_ds.engine import ds_config as dsc
from tests.helpers import ROOT

FILES = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_all_shipped_configs_exist():
    names = {os.path.basename(f) for f in FILES}
    assert {"cpu.json", "zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_offload.json",
            "recipe_60m.json", "recipe_1b.json"} <= names


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_shipped_config_passes_deepspeed_validator(path, world_size):
    config = dsc.reconcile(dsc.load_ds_config(path), lr=1e-3, world_size=world_size, source=path)
    assert config["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in config
    assert dsc.zero_stage(config) in (0, 1, 2, 3)
    if "train_batch_size" in config:
        assert config["train_batch_size"] == dsc.micro_batch_size(config) * dsc.grad_accum_steps(config) * world_size


def test_stage_and_precision_readers():
    z3 = dsc.load_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json"))
    cpu = dsc.load_ds_config(os.path.join(ROOT, "ds_configs", "cpu.json"))
    assert (dsc.zero_stage(z3), dsc.precision(z3)) == (3, "bf16")
    assert (dsc.zero_stage(cpu), dsc.precision(cpu)) == (0, "fp32")


def base():
    return {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def test_scheduler_section_is_refused():
    with pytest.raises(dsc.DSConfigError, match="remove the 'scheduler' section"):
        dsc.reconcile({**base(), "scheduler": {"type": "WarmupLR"}}, lr=1e-3, world_size=1, source="x.json")


def test_lr_disagreement_is_refused():
    config = base()
    config["optimizer"]["params"]["lr"] = 5e-4
    with pytest.raises(dsc.DSConfigError, match=r"x.json: optimizer.params.lr 0.0005 disagrees with schedule.lr 0.001"):
        dsc.reconcile(config, lr=1e-3, world_size=1, source="x.json")


def test_batch_arithmetic_is_checked_with_world_size():
    config = {**base(), "gradient_accumulation_steps": 2, "train_batch_size": 8}
    assert dsc.reconcile(config, lr=1e-3, world_size=1)["train_batch_size"] == 8
    with pytest.raises(dsc.DSConfigError, match=r"train_batch_size 8 != .* 4 x .* 2 x world size 2 = 16"):
        dsc.reconcile(config, lr=1e-3, world_size=2)


def test_grad_clipping_disagreement_and_fill():
    assert dsc.reconcile(base(), lr=1e-3, world_size=1, max_grad_norm=0.5)["gradient_clipping"] == 0.5
    with pytest.raises(dsc.DSConfigError, match="gradient_clipping 1.0 disagrees with train.max_grad_norm 0.5"):
        dsc.reconcile({**base(), "gradient_clipping": 1.0}, lr=1e-3, world_size=1, max_grad_norm=0.5)


def test_missing_sections_and_bad_values():
    with pytest.raises(dsc.DSConfigError, match="'optimizer' section is required"):
        dsc.reconcile({"train_micro_batch_size_per_gpu": 4}, lr=1e-3, world_size=1)
    with pytest.raises(dsc.DSConfigError, match="'train_micro_batch_size_per_gpu' is required"):
        dsc.reconcile({"optimizer": {"type": "AdamW"}}, lr=1e-3, world_size=1)
    with pytest.raises(dsc.DSConfigError, match="gradient_accumulation_steps must be a positive integer"):
        dsc.reconcile({**base(), "gradient_accumulation_steps": 0}, lr=1e-3, world_size=1)


def test_deepspeed_rejects_unknown_zero_key():
    config = {**base(), "zero_optimization": {"stage": 2, "bogus_knob": 1}}
    with pytest.raises(dsc.DSConfigError, match="rejected by DeepSpeed: .*bogus_knob"):
        dsc.reconcile(config, lr=1e-3, world_size=1)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(dsc.DSConfigError, match="nope.json: DeepSpeed config file not found"):
        dsc.load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{\"a\": 1,,}")
    with pytest.raises(dsc.DSConfigError, match=r"bad.json: not valid JSON \(.* line 1"):
        dsc.load_ds_config(str(bad))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([1]))
    with pytest.raises(dsc.DSConfigError, match="expected a JSON object"):
        dsc.load_ds_config(str(arr))


def test_shipped_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ds_configs/ here: the name means the shipped file
    assert dsc.resolve_path("ds_configs/zero3.json") == os.path.join(ROOT, "ds_configs", "zero3.json")
    assert dsc.load_ds_config("ds_configs/cpu.json")["train_micro_batch_size_per_gpu"] >= 1
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "cpu.json").write_text('{"train_micro_batch_size_per_gpu": 7}')
    assert dsc.load_ds_config("ds_configs/cpu.json")["train_micro_batch_size_per_gpu"] == 7  # a local file wins
    with pytest.raises(dsc.DSConfigError, match=r"ds_configs/nope.json: DeepSpeed config file not found .*"
                                                r"shipped configs: .*ds_configs/zero3.json"):
        dsc.load_ds_config("ds_configs/nope.json")
    assert dsc.shipped_configs() == sorted(os.path.basename(f) for f in FILES)


def test_fp16_without_cuda_is_refused_in_one_line():
    config = {**base(), "fp16": {"enabled": True}}
    with pytest.raises(dsc.DSConfigError) as info:
        dsc.reconcile(config, lr=1e-3, world_size=1, source="half.json", cuda_available=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("half.json: fp16.enabled is true but CUDA is not available")
    assert "use bf16 or fp32 (e.g. ds_configs/cpu.json)" in message
    assert dsc.reconcile(config, lr=1e-3, world_size=1, cuda_available=True)["fp16"]["enabled"]
    assert dsc.precision(dsc.reconcile({**base(), "fp16": {"enabled": False}}, lr=1e-3, world_size=1,
                                       cuda_available=False)) == "fp32"


def fitted(config: dict, world_size: int) -> tuple[int, int]:
    reconciled = dsc.reconcile(config, lr=1e-3, world_size=world_size)
    return dsc.micro_batch_size(reconciled), dsc.grad_accum_steps(reconciled)


@pytest.mark.parametrize("name, max_micro, worlds", [("recipe_60m.json", 32, [1, 2, 3, 8, 10]),
                                                     ("recipe_1b.json", 16, [1, 2, 8, 64])])
def test_recipes_keep_the_global_batch_at_any_gpu_count(name, max_micro, worlds):
    config = dsc.load_ds_config(os.path.join(ROOT, "ds_configs", name))
    assert "gradient_accumulation_steps" not in config and config["train_micro_batch_size_per_gpu"] == max_micro
    for world in worlds:
        micro, accum = fitted(config, world)
        assert micro * accum * world == config["train_batch_size"] and micro <= max_micro
        smaller = [a for a in range(1, accum) if config["train_batch_size"] % (world * a) == 0
                   and config["train_batch_size"] // (world * a) <= max_micro]
        assert smaller == [], f"world {world}: accumulation {accum} is not the smallest that fits"


def test_fitted_batch_values():
    recipe = {**base(), "train_batch_size": 480, "train_micro_batch_size_per_gpu": 32}
    assert [fitted(recipe, w) for w in (1, 2, 3, 8, 10)] == [(32, 15), (30, 8), (32, 5), (30, 2), (24, 2)]
    recipe = {**base(), "train_batch_size": 1536, "train_micro_batch_size_per_gpu": 16}
    assert [fitted(recipe, w) for w in (1, 2, 8, 64, 1536)] == [(16, 96), (16, 48), (16, 12), (12, 2), (1, 1)]


def test_global_batch_not_divisible_by_world_size_is_one_line():
    recipe = {**base(), "train_batch_size": 1536, "train_micro_batch_size_per_gpu": 16}
    with pytest.raises(dsc.DSConfigError) as info:
        dsc.reconcile(recipe, lr=1e-3, world_size=7, source="recipe_1b.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("recipe_1b.json: train_batch_size 1536 is not divisible by the world size 7")
    assert message.endswith("GPU counts that work: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, "
                            "384, 512, 768")


def test_explicit_accumulation_keeps_the_strict_check():
    config = {**base(), "train_batch_size": 480, "train_micro_batch_size_per_gpu": 32,
              "gradient_accumulation_steps": 15}
    assert fitted(config, 1) == (32, 15)
    with pytest.raises(dsc.DSConfigError, match=r"train_batch_size 480 != .* 32 x .* 15 x world size 2 = 960"):
        fitted(config, 2)


@pytest.mark.parametrize("name, tokens", [("60m.yaml", 122_880), ("1b.yaml", 786_432)])
def test_paper_recipes_use_the_paper_global_batch(name, tokens):
    from relora_ds.config import load_config

    cfg = load_config(os.path.join(ROOT, "relora_ds", "configs", name))
    config = dsc.load_ds_config(cfg.train.deepspeed_config)
    assert config["train_batch_size"] * cfg.data.seq_len == tokens
    assert (dsc.precision(config), dsc.zero_stage(config)) == ("bf16", 2 if name == "60m.yaml" else 3)


@pytest.mark.parametrize("name", ["60m.yaml", "1b.yaml"])
def test_streaming_recipes_tokenize_off_the_training_loop(name):
    """The shipped streaming recipes use data workers, and C4 en's 1024 shards split whole over their readers
    for every power-of-two GPU count (each reader takes whole shards: stream.by_shards)."""
    from relora_ds.config import load_config
    from relora_ds.data.stream import by_shards

    cfg = load_config(os.path.join(ROOT, "relora_ds", "configs", name))
    assert cfg.data.streaming and cfg.data.num_workers >= 1
    assert all(by_shards(1024, gpus * cfg.data.num_workers) for gpus in (1, 2, 4, 8, 16, 64, 256))

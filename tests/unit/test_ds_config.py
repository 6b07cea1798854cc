import glob
import json
import os

import pytest

from relora_ds.engine import ds_config as dsc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_all_shipped_configs_exist():
    names = {os.path.basename(f) for f in FILES}
    assert {"cpu.json", "zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_shipped_config_passes_deepspeed_validator(path):
    config = dsc.reconcile(dsc.load_ds_config(path), lr=1e-3, world_size=2, source=path)
    assert config["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in config
    assert dsc.zero_stage(config) in (0, 1, 2, 3)


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


"""The streamed export: the lazy reader of DeepSpeed checkpoints (engine/zero_checkpoint.py) is bitwise DeepSpeed's
own consolidation on every layout DeepSpeed writes here (ZeRO 0-3, fp32 and bf16, 2 gloo ranks, ReLoRA-wrapped or
not, fixed or trainable scaling, tied embeddings), and `relora-ds export` writes sharded safetensors that load into
the same model as the consolidated, merged checkpoint; bf16 exports are the fp32 export cast; bad settings are one
line."""

import glob
import json
import os
import shutil

import pytest
import torch

from relora_ds import cli
from relora_ds.engine import checkpoint
from tests.helpers.runs import ds_config
from tests.helpers.spawn import run_on_ranks
from tests.helpers.tiny import BYTE_VOCAB, fixed_batch

pytestmark = pytest.mark.slow

# name: (ZeRO stage, bf16, wrapped, trainable scaling, tied embeddings through model.init_from)
LAYOUTS = {
    "z0": (0, False, True, False, False),
    "z0_bf16": (0, True, False, False, False),
    "z1": (1, False, True, True, False),
    "z1_bf16": (1, True, True, False, False),
    "z2_tied": (2, False, True, False, True),
    "z2_bf16": (2, True, True, True, False),
    "z3": (3, False, True, True, False),
    "z3_bf16": (3, True, True, False, False),
}


def _run_config(directory: str, name: str):
    from relora_ds.config import load_config

    _, _, _, scaling, tied = LAYOUTS[name]
    overrides = ["model.preset=tiny", f"model.vocab_size={BYTE_VOCAB}", "relora.rank=4", "relora.alpha=8",
                 "relora.target_modules=[q_proj,v_proj,down_proj]", "relora.kernels=torch",
                 f"relora.trainable_scaling={str(scaling).lower()}"]
    if tied:
        overrides.append(f"model.init_from={os.path.join(directory, 'tied_init')}")
    return load_config(None, overrides)


def _make_checkpoints(rank, world_size, directory):
    """Every layout: the run's model (built partitioned on ZeRO-3, as the trainer does), wrapped or not, three
    AdamW steps on 2 ranks at a high LR (B, A and g all move), then relora-ds' own checkpoint.save."""
    from relora_ds.engine import runtime
    from relora_ds.model.build import model_from_config
    from relora_ds import methods
    from tests.helpers.tiny import token_batches

    for name, (stage, bf16, wrapped, _, _) in LAYOUTS.items():
        cfg = _run_config(directory, name)
        config = ds_config(stage, bf16=bf16, adamw={"lr": 2e-2, "torch_adam": True})
        model = model_from_config(cfg.model, BYTE_VOCAB, seed=0, attn_implementation="sdpa",
                                  zero3_config=config if stage == 3 else None)
        if wrapped:
            methods.from_config(cfg).wrap(model)
        engine = runtime.make_engine(model, config)
        batches = token_batches(2, 16, seed=rank)
        for _ in range(3):
            ids = next(batches)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        checkpoint.save(engine, os.path.join(directory, name, "checkpoints"), step=3, keep_last=1,
                        state={"step": 3, "wrapped": wrapped, "config": cfg.to_dict()})
        engine.destroy()
    return True


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → tag dir of each layout (one spawn of 2 gloo ranks for all of them)."""
    from transformers import AutoModelForCausalLM

    from relora_ds.model.build import preset_config

    directory = str(tmp_path_factory.mktemp("ckpts"))
    config = preset_config("tiny", BYTE_VOCAB, attn_implementation="sdpa")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(directory, "tied_init"))
    run_on_ranks(_make_checkpoints, world_size=2, args=(directory,), timeout=400)
    return {name: checkpoint.find_checkpoint(os.path.join(directory, name)) for name in LAYOUTS}


def _deepspeed_state_dict(tag_dir: str) -> dict:
    """DeepSpeed's own consolidated fp32 state dict (the module itself on ZeRO-0), as the old export read it."""
    files = glob.glob(os.path.join(tag_dir, "*optim_states.pt"))
    if not files:
        module = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir, tag = os.path.split(tag_dir)
    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag).items()}


def _frozen_from_module(tag_dir: str) -> dict:
    """ZeRO-1 saves no frozen fragments (and DeepSpeed's consolidation leaves the frozen W out): the module of
    mp_rank_00_model_states.pt holds them whole."""
    state = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    trainable = {name for group in state["param_shapes"] for name in group}
    return {k: v.float() for k, v in state["module"].items() if k not in trainable}


def _consolidated_merged_model(name: str, tag_dir: str):
    """The old export path: DeepSpeed's consolidated dict into the wrapped model, merged by unwrap (on ZeRO-1 with
    the frozen W from the module, which the old path missed)."""
    from relora_ds.config import RunConfig
    from relora_ds.model.build import model_from_config
    from relora_ds import methods
    from relora_ds.relora.wrap import unwrap

    state = checkpoint.read_state(tag_dir)
    cfg = RunConfig.from_dict(state["config"])
    weights = _deepspeed_state_dict(tag_dir)
    if LAYOUTS[name][0] == 1:
        for key, tensor in _frozen_from_module(tag_dir).items():
            weights.setdefault(key, tensor)
    model = model_from_config(cfg.model, BYTE_VOCAB, attn_implementation="sdpa")
    if state["wrapped"]:
        cfg.relora.kernels = "torch"
        methods.from_config(cfg).wrap(model)
    model.load_state_dict(weights, strict=True)
    unwrap(model)
    return model.eval()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lazy_state_dict_is_deepspeeds_consolidation_bitwise(checkpoints, name):
    from relora_ds.engine.zero_checkpoint import lazy_fp32_state_dict

    tag_dir = checkpoints[name]
    lazy = lazy_fp32_state_dict(tag_dir)
    expected = _deepspeed_state_dict(tag_dir)
    stage, _, wrapped, scaling, tied = LAYOUTS[name]
    if stage == 1 and wrapped:  # DeepSpeed's consolidation drops ZeRO-1's frozen W; the lazy dict has them
        frozen = {k: v for k, v in _frozen_from_module(tag_dir).items() if k not in expected}
        assert sorted(set(lazy) - set(expected)) == sorted(frozen) and len(frozen) == 6
        expected.update(frozen)
    if stage == 1:
        assert set(lazy) == set(expected)
    else:
        assert list(lazy) == list(expected)  # DeepSpeed's order too
    for key, tensor in expected.items():
        got = lazy[key].load()
        assert got.dtype == torch.float32 and lazy[key].shape == tensor.shape and lazy[key].numel() == tensor.numel()
        assert torch.equal(got, tensor) and not got.requires_grad, key
    assert any(k.endswith("lora_scaling") for k in lazy) == scaling
    assert "lm_head.weight" in lazy
    if tied:  # DeepSpeed's shared_params: the alias is the same tensor
        assert lazy["lm_head.weight"] is lazy["model.embed_tokens.weight"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_export_loads_as_the_consolidated_merged_model(checkpoints, name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relora_ds.tools.eval import load_checkpoint_model

    out = tmp_path / "hf"
    assert cli.main(["export", checkpoints[name], "--out", str(out), "--max-shard-size", "90KB"]) == 0
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(files)
    assert not glob.glob(str(tmp_path / ".hf*"))  # the temporary sibling is gone
    index = json.load(open(out / "model.safetensors.index.json"))
    written = {}
    for shard in shards:
        tensors = load_file(out / shard)
        assert os.path.getsize(out / shard) < 90_000 + 8_192 or len(tensors) == 1  # + the JSON header
        written.update({k: (shard, v) for k, v in tensors.items()})
    assert index["weight_map"] == {k: shard for k, (shard, _) in written.items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for _, v in written.values())
    assert not any("lora" in k for k in written)
    assert ("lm_head.weight" in written) != LAYOUTS[name][4]  # tied: left out, as save_pretrained does

    if LAYOUTS[name][2]:  # the adapters moved: the merge changes W
        from relora_ds.engine.zero_checkpoint import lazy_fp32_state_dict

        w = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(written[w][1], lazy_fp32_state_dict(checkpoints[name])[w].load())
    reference = _consolidated_merged_model(name, checkpoints[name])
    expected = reference.state_dict()
    for key, (_, tensor) in written.items():
        assert torch.equal(tensor, expected[key]), key
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == LAYOUTS[name][4]
    ids = fixed_batch(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        model, _, _ = load_checkpoint_model(checkpoints[name])  # what `relora-ds eval CHECKPOINT` evaluates
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["z3_bf16", "z2_tied"])
def test_bf16_export_is_the_fp32_export_cast(checkpoints, name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from relora_ds.tools.export import export

    fp32 = export(checkpoints[name], str(tmp_path / "fp32"))
    bf16 = export(checkpoints[name], str(tmp_path / "bf16"), dtype="bf16", max_shard_size="2GiB")
    assert sorted(f for f in os.listdir(fp32) if f.endswith(".safetensors")) == ["model.safetensors"]
    assert not os.path.exists(os.path.join(bf16, "model.safetensors.index.json"))
    full, half = load_file(os.path.join(fp32, "model.safetensors")), load_file(os.path.join(bf16, "model.safetensors"))
    assert list(full) and set(full) == set(half)
    for key, tensor in full.items():
        assert half[key].dtype == torch.bfloat16 and torch.equal(half[key], tensor.to(torch.bfloat16)), key
    assert json.load(open(os.path.join(bf16, "config.json")))["dtype"] == "bfloat16"
    assert json.load(open(os.path.join(fp32, "config.json")))["dtype"] == "float32"
    ids = fixed_batch(2, 16)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)(input_ids=ids).logits
        cast = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16)(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, cast)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_settings_and_out_dir_errors_are_one_line(checkpoints, tmp_path, capsys):
    from relora_ds.tools.export import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 << 30
    assert parse_size("1.5kb") == 1500 and parse_size("4096") == 4096
    tag_dir = checkpoints["z2_bf16"]
    for bad in ("5XB", "big", "0GB", "-1MB"):
        assert cli.main(["export", tag_dir, "--out", str(tmp_path / "x"), f"--max-shard-size={bad}"]) == 2
        assert f"--max-shard-size '{bad}'" in _error_line(capsys)
    assert not (tmp_path / "x").exists()

    taken = tmp_path / "notes"
    taken.mkdir()
    (taken / "todo.txt").write_text("keep me")
    assert cli.main(["export", tag_dir, "--out", str(taken)]) == 2
    assert "holds no previous export" in _error_line(capsys) and (taken / "todo.txt").read_text() == "keep me"

    # A previous export is replaced as a whole: no file of the sharded one survives the single-file one.
    out = tmp_path / "hf"
    assert cli.main(["export", tag_dir, "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert cli.main(["export", tag_dir, "--out", str(out), "--dtype", "bf16"]) == 0
    assert "(bf16)" in capsys.readouterr().out
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "notes"]


def test_a_checkpoint_that_is_not_its_configs_model_is_one_line(checkpoints, tmp_path, capsys):
    copy = tmp_path / "ckpt" / "step_00000003"
    shutil.copytree(checkpoints["z3"], copy)
    os.remove(copy / checkpoint.MANIFEST)  # the edited run state would no longer match it
    state = json.load(open(copy / checkpoint.STATE_FILE))
    state["config"]["model"]["preset"] = "20m"
    json.dump(state, open(copy / checkpoint.STATE_FILE, "w"))
    assert cli.main(["export", str(copy), "--out", str(tmp_path / "hf")]) == 2
    line = _error_line(capsys)
    assert "checkpoint does not match its config (model.preset 20m): missing ['model.layers.2" in line
    state["config"]["model"]["preset"] = "tiny"
    state["config"]["relora"]["rank"] = 8
    json.dump(state, open(copy / checkpoint.STATE_FILE, "w"))
    assert cli.main(["export", str(copy), "--out", str(tmp_path / "hf")]) == 2
    assert "do not fit relora.rank 8" in _error_line(capsys)
    assert not (tmp_path / "hf").exists()

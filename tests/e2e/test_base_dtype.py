"""relora.base_dtype int8 / fp8 / bf16 in training: the stored W survives DeepSpeed's casts, is re-quantized at every
merge, resumes bitwise at every event boundary (CPU fp32 compute; bf16 runs bitwise on CPU too), exports as the
dequantized merged weights that plain transformers loads, and is refused in one line where it cannot work."""

import os

import pytest
import torch

from relora_ds import trainer
from relora_ds.errors import RunError
from relora_ds.relora import functional
from relora_ds.relora.wrap import relora_modules
from relora_ds.tools.reader import open_checkpoint
from tests.helpers.resume import assert_resumed_exactly, resume_matrix
from tests.helpers.runs import read_metrics, short_run_config, write_corpus, write_ds_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("stage,bf16,base_dtype,rounding", [(2, False, "int8", "stochastic"),
                                                           (1, True, "fp8", "nearest")],
                         ids=["zero2-fp32-int8-stochastic", "zero1-bf16-fp8-nearest"])
def test_resume_matrix_with_a_stored_w(corpus, tmp_path, stage, bf16, base_dtype, rounding):
    """From the switch (W quantized there), mid-cycle, the restart (a merge re-quantizes W, stochastic draws from the
    restart's generator) and one step after it: every loss and gradient norm equal to the uninterrupted run's."""
    ds = write_ds_config(tmp_path, stage=stage, bf16=bf16)
    results = resume_matrix(str(tmp_path), ds, f"zero{stage}", *corpus, **{
        "relora.base_dtype": base_dtype, "relora.merge_rounding": rounding})
    assert_resumed_exactly(results)


def test_stored_w_trains_exports_and_reads_back(corpus, tmp_path):
    """ZeRO-2 bf16 with int8 W through the switch and a restart: W stays int8 with fp32 scales on the engine (DeepSpeed
    casts parameters only), the memory records carry its bytes, and the checkpoint reads back (export, analyze) as the
    module's own dequantized W + s·B·A, which plain transformers loads."""
    from transformers import AutoModelForCausalLM

    from relora_ds.tools.export import export

    ds = write_ds_config(tmp_path, stage=2, bf16=True)
    cfg = short_run_config(tmp_path, *corpus, ds, **{"relora.base_dtype": "int8",
                                                    "train.output_dir": str(tmp_path / "run")})
    summary = trainer.train(cfg, keep_engine=True)
    engine = summary["engine"]
    layers = relora_modules(engine.module)
    assert [r["step"] for r in summary["restarts"]] == [4]
    assert layers and all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
                          for m in layers.values())
    stored = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layers.values())
    memory = [r for r in read_metrics(str(tmp_path / "run")) if r.get("event") == "memory"]
    assert memory[0]["frozen_w_gib"] == 0  # before the switch: nothing is wrapped
    assert memory[-1]["frozen_w_gib"] == round(stored / 2**30, 4)
    dequantized = {name: m.dequantized_weight() for name, m in layers.items()}
    engine.destroy()

    reader = open_checkpoint(str(tmp_path / "run"))  # W + s·B·A from the int8 W and the fp32 masters of A and B
    expected = {f"{name}.weight": w + functional.lora_delta(reader.lazy[f"{name}.lora_A"].load(),
                                                            reader.lazy[f"{name}.lora_B"].load(), 8 / 4)
                for name, w in dequantized.items()}
    read = dict(reader.tensors(list(expected)))
    for name, weight in expected.items():
        torch.testing.assert_close(read[name], weight, rtol=0, atol=1e-6)
    out = export(str(tmp_path / "run"), str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], weight, rtol=0, atol=1e-6)
    assert not any(k.endswith(("weight_scale", "lora_A", "lora_B")) for k in state)
    assert os.path.isfile(os.path.join(out, "config.json"))


@pytest.mark.parametrize("fields,stage,ds_extra,message", [
    ({"relora.base_dtype": "int8"}, 3, {},
     "relora.base_dtype int8: needs zero_optimization.stage 0, 1 or 2, got 3; a stored W is replicated"),
    ({"relora.base_dtype": "int8", "method": "full", "relora.warm_start_steps": 0}, 0, {},
     "relora.base_dtype: must be auto with method full"),
    ({"relora.base_dtype": "bf16", "relora.kernels": "triton"}, 0, {},
     "relora.kernels triton: the fused kernels take W in the run's dtype or as int8/fp8"),
], ids=["zero3", "full", "triton"])
def test_impossible_settings_are_refused_in_one_line_at_step_0(corpus, tmp_path, fields, stage, ds_extra, message):
    ds = write_ds_config(tmp_path, stage=stage, **ds_extra)
    cfg_fields = {"train.output_dir": str(tmp_path / "run"), **fields}
    with pytest.raises((RunError, ValueError)) as raised:
        trainer.train(short_run_config(tmp_path, *corpus, ds, **cfg_fields))
    line = str(raised.value)
    assert message in line and "\n" not in line
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


BUILD_PEAK = """
import sys
import torch
from relora_ds import methods
from relora_ds.config import RunConfig
from relora_ds.model.build import build_from_config, load_module_by_module, preset_config
mode = sys.argv[1]
hook = None
if mode in ("int8", "load-int8"):
    hook = methods.from_config(RunConfig.from_dict({"relora": {"base_dtype": "int8", "rank": 8}})).wrap_while_building(
        torch.float32)
if mode == "bf16-auto":
    hook = methods.from_config(RunConfig.from_dict({"relora": {"rank": 8}})).wrap_while_building(torch.bfloat16)
if mode == "save":
    build_from_config(preset_config("350m", 4096), seed=0).save_pretrained(sys.argv[2])
elif mode == "load-int8":
    load_module_by_module(sys.argv[2], hook)
else:
    build_from_config(preset_config("350m", 4096), seed=0, per_module=hook)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024)
"""


def _peak(*args) -> int:
    """Peak RSS (bytes) of BUILD_PEAK run in a process of its own with `args`."""
    import subprocess
    import sys

    from tests.helpers import ROOT
    from tests.helpers.runs import cpu_env

    out = subprocess.run([sys.executable, "-c", BUILD_PEAK, *args], capture_output=True, text=True, check=True,
                         env=cpu_env(), cwd=ROOT)
    return int(out.stdout.split()[-1])


def test_an_int8_or_bf16_build_never_holds_the_full_precision_w():
    """350m at rank 8 (302M wrapped weights: 1.13 GiB in fp32, 0.56 GiB in bf16, 0.28 GiB in int8): the build's peak
    RSS drops by at least 90% of the difference, with an int8 W (measured: 96%) and with base_dtype auto in a bf16 run
    (each wrapped layer cast as it is built); a build that made the fp32 model first and quantized or cast it after
    would not drop at all, nor one whose freed W stayed on the heap (81% before each freed W was trimmed)."""
    peaks = {mode: _peak(mode) for mode in ("plain", "int8", "bf16-auto")}
    wrapped = 302_383_104
    assert peaks["plain"] - peaks["int8"] > 0.9 * wrapped * 3, peaks  # bytes per wrapped weight: 4 in fp32, 1 in int8
    assert peaks["plain"] - peaks["bf16-auto"] > 0.9 * wrapped * 2, peaks  # 2 in bf16


def test_a_load_into_an_int8_w_holds_no_more_than_the_int8_build(tmp_path):
    """model.init_from (350m, fp32 safetensors, 1.16 GiB) loaded module by module into an int8 W peaks within 0.2 GiB
    of the int8 build from scratch (measured: equal). With one mapping of the file held over the whole load, every page
    of the checkpoint stayed resident beside the model (1.91 GiB against 0.76)."""
    _peak("save", str(tmp_path / "model"))
    built, loaded = _peak("int8"), _peak("load-int8", str(tmp_path / "model"))
    assert loaded - built < 0.2 * 2**30, (built, loaded)


@pytest.mark.parametrize("base_dtype, stage, w_bytes", [("int8", 0, 302_383_104), ("auto", 2, 4 * 302_383_104)])
def test_a_resume_reads_each_w_through_a_mapping_of_its_own(corpus, tmp_path, base_dtype, stage, w_bytes):
    """350m, rank 8, fp32, each run its own process; an int8 W (0.28 GiB) on ZeRO-0, or the frozen fp32 Parameter
    of auto (1.13 GiB) on ZeRO-2, whose load copies it twice (the module's state, then DeepSpeed's frozen
    fragments): the resume (build, engine, load) peaks less than half a W above the first run's build. Read through
    the one mapping of the model-states file that DeepSpeed's load holds, every page of W stayed resident beside the
    module's own copy (a 7b int8 resume on one rank peaked at 14.4 GiB, 6 GiB of it the second W)."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT
    from tests.helpers.runs import cpu_env

    ds = write_ds_config(tmp_path, stage=stage, micro_batch=1)
    fields = {"model.preset": "350m", "relora.rank": 8, "relora.base_dtype": base_dtype, "relora.warm_start_steps": 0,
              "relora.reset_every": 4, "data.seq_len": 16, "train.total_steps": 2, "train.eval_every": 0,
              "schedule.warmup_steps": 1, "schedule.restart_warmup_steps": 1, "checkpoint.at_switch": False,
              "train.output_dir": str(tmp_path / "run")}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(short_run_config(tmp_path, *corpus, ds, **fields).to_dict()))
    for extra in ([], ["--resume"]):
        run = subprocess.run([sys.executable, "-m", "relora_ds", "train", "--config", str(config), *extra],
                             env=cpu_env(), cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    memory = {r["phase"]: r["peak_gib"] for r in read_metrics(str(tmp_path / "run")) if r.get("event") == "memory"}
    assert memory["resume"] - memory["build"] < 0.5 * w_bytes / 2**30, memory

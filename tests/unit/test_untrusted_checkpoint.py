"""A checkpoint someone else wrote runs no code: `export`, `eval` and `analyze` read DeepSpeed's files with
torch.load(weights_only=True), allowing only the few DeepSpeed types its checkpoints hold, and a file whose pickle
names anything else is one CheckpointError line, before any of it is run. Tags are built by hand (no DeepSpeed
run): the files, the run state, then the module's mark_complete, as save() does."""

import json
import os
import subprocess
import sys

import pytest
import torch

from relora_ds.config import load_config
from relora_ds.engine import checkpoint
from tests.helpers import ROOT
from tests.helpers.runs import cpu_env

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
SYSTEM = f"{os.system.__module__}.system"  # what a pickle of os.system names (posix.system on Linux)


class Payload:
    """Unpickled by a full torch.load, this runs `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_tag(directory, marker: str, where: str = MODEL_FILE) -> str:
    """A complete step_* tag of a tiny run whose file `where` carries the payload next to real tensors."""
    tag_dir = os.path.join(str(directory), "run", "checkpoints", checkpoint.tag_for(3))
    os.makedirs(tag_dir)
    module = {"model.embed_tokens.weight": torch.zeros(8, 4)}
    model_state = {"module": module, "buffer_names": [], "param_shapes": [{}]}
    if where == MODEL_FILE:
        model_state["ds_config"] = Payload(marker)
    torch.save(model_state, os.path.join(tag_dir, MODEL_FILE))
    if where == OPTIM_FILE:
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1, "loss_scaler": Payload(marker)}},
                   os.path.join(tag_dir, OPTIM_FILE))
    cfg = load_config(None, ["model.preset=tiny"])
    with open(os.path.join(tag_dir, checkpoint.STATE_FILE), "w") as f:
        json.dump({"step": 3, "wrapped": False, "config": cfg.to_dict()}, f)
    checkpoint.mark_complete(tag_dir, 3)
    return tag_dir


def _check_refusal(message: str, tag_dir: str, where: str = MODEL_FILE) -> None:
    assert "\n" not in message
    assert message.startswith(f"{os.path.join(tag_dir, where)}: holds a pickled object of type {SYSTEM}, "), \
        message
    assert message.endswith("not a tensor or a known DeepSpeed type, so it is not loaded (untrusted checkpoint)")


def test_the_payload_runs_under_a_full_unpickle(tmp_path):
    """The fixture is a real attack: torch.load(weights_only=False) of its model states runs the command."""
    marker = tmp_path / "ran"
    tag_dir = malicious_tag(tmp_path, str(marker))
    torch.load(os.path.join(tag_dir, MODEL_FILE), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", [MODEL_FILE, OPTIM_FILE])
def test_export_refuses_a_pickled_call_in_one_line_and_runs_nothing(tmp_path, where):
    from relora_ds.tools.export import export

    marker = tmp_path / "ran"
    tag_dir = malicious_tag(tmp_path, str(marker), where)
    with pytest.raises(checkpoint.CheckpointError) as info:
        export(str(tmp_path / "run"), str(tmp_path / "hf"))
    _check_refusal(str(info.value), tag_dir, where)
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_analyze_refuses_it_too(tmp_path):
    from relora_ds.tools.analyze import open_side

    marker = tmp_path / "ran"
    tag_dir = malicious_tag(tmp_path, str(marker))
    with pytest.raises(checkpoint.CheckpointError) as info:
        open_side(tag_dir)
    _check_refusal(str(info.value), tag_dir)
    assert not marker.exists()
    from relora_ds.engine.zero_checkpoint import _deepspeed_globals

    # The DeepSpeed types are allowed for that read only (torch's own list may grow as torch modules are imported).
    assert not set(_deepspeed_globals()) & set(torch.serialization.get_safe_globals())


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
def test_cli_export_prints_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    tag_dir = malicious_tag(tmp_path, str(marker))
    result = subprocess.run([sys.executable, "-m", "relora_ds", "export", str(tmp_path / "run"), "--out",
                             str(tmp_path / "hf")], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    _check_refusal(lines[0][len("error: "):], tag_dir)
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()

"""`relora-ds analyze` on tiny real runs (world size 1, DeepSpeed on the CPU): a LoRA run moves each projection by
at most r singular directions, a ReLoRA run with three merges by more; RUN_DIR, A B (checkpoints and exports) and
--compare agree; a checkpoint of several layers is analysed holding a few tensors, not the model."""

import json
import os

import pytest
import torch

from relora_ds import cli, trainer
from relora_ds.engine import checkpoint
from relora_ds.tools import analyze
from relora_ds.tools.export import export
from relora_ds.tools.reader import merged_tensors
from tests.helpers.live_bytes import LiveBytes
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow

RANK = 4
TOLERANCE = 1e-5  # relative to a weight's largest singular value


def run(cfg):
    trainer.train(cfg)
    return cfg.train.output_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run (wrapped at step 4, never merged) and a ReLoRA run (wrapped at 4, merged at 8 and 12, 16 steps:
    three rank-4 updates with the final adapters), rank 4, tiny model, no evals."""
    root = tmp_path_factory.mktemp("analyze")
    train_file, val_file = write_corpus(root)
    ds = write_ds_config(root)
    common = {"relora.rank": RANK, "relora.warm_start_steps": 4, "train.eval_every": 0, "train.total_steps": 16}
    lora = run(tiny_run_config(root, train_file, val_file, ds, **common, **{
        "method": "lora", "train.output_dir": str(root / "lora")}))
    relora = run(tiny_run_config(root, train_file, val_file, ds, **common, **{
        "method": "relora", "relora.reset_every": 4, "train.output_dir": str(root / "relora")}))
    return root, lora, relora


def ranks(result) -> list[int]:
    """Per entry, how many singular values exceed TOLERANCE x the largest."""
    return [sum(v > TOLERANCE * max(e["singular_values"]) for v in e["singular_values"]) for e in result["entries"]]


def test_lora_moves_at_most_r_directions_relora_more(runs):
    _, lora, relora = runs
    low = analyze.analyze_run(lora, progress=False)
    high = analyze.analyze_run(relora, progress=False)
    for result in (low, high):
        assert result["a"]["step"] == 4 and result["b"]["step"] == 16
        assert len(result["entries"]) == 2 * 7  # tiny: 2 layers x 7 projections
        assert all(max(e["singular_values"]) > 1e-3 for e in result["entries"])
    assert all(0 < r <= RANK for r in ranks(low)), ranks(low)
    assert all(RANK < r <= 3 * RANK for r in ranks(high)), ranks(high)
    assert sum(e["effective_rank"] for e in high["entries"]) > sum(e["effective_rank"] for e in low["entries"])


def test_command_line_forms_agree(runs, tmp_path, capsys):
    root, lora, relora = runs
    reference, final = checkpoint.reference_checkpoint(relora), checkpoint.find_checkpoint(relora)
    assert os.path.basename(reference) == "step_00000004" and os.path.basename(final) == "step_00000016"

    out = tmp_path / "run"
    assert cli.main(["analyze", relora, "--out", str(out), "--no-progress"]) == 0
    with open(out / "spectra.json") as f:
        doc = json.load(f)
    assert list(doc["runs"]) == ["relora"]
    by_run = doc["runs"]["relora"]
    assert by_run["a"]["resolved"] == reference and by_run["b"]["resolved"] == final
    assert open(out / "spectra.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    values = [e["singular_values"] for e in by_run["entries"]]

    # A B: two checkpoints, an export and a checkpoint, a checkpoint and an export: the same singular values.
    exported_final = export(final, str(tmp_path / "export-final"))
    exported_reference = export(reference, str(tmp_path / "export-reference"), max_shard_size="100KB")
    assert os.path.isfile(os.path.join(exported_reference, "model.safetensors.index.json"))  # sharded
    for a, b in ((reference, final), (reference, exported_final), (exported_reference, final),
                 (exported_reference, exported_final)):
        got = analyze.analyze_pair(a, b, progress=False)
        assert [e["name"] for e in got["entries"]] == [e["name"] for e in by_run["entries"]]
        for e, expected in zip(got["entries"], values):
            torch.testing.assert_close(torch.tensor(e["singular_values"]), torch.tensor(expected), rtol=1e-5,
                                       atol=1e-7)

    # --compare: both runs in one JSON and figure, labelled by directory (or --labels).
    out = tmp_path / "compare"
    assert cli.main(["analyze", relora, "--compare", lora, "--out", str(out), "--no-progress"]) == 0
    with open(out / "spectra.json") as f:
        doc = json.load(f)
    assert list(doc["runs"]) == ["relora", "lora"]
    assert [e["singular_values"] for e in doc["runs"]["relora"]["entries"]] == values
    assert doc["runs"]["lora"]["b"]["resolved"] == checkpoint.find_checkpoint(lora)
    printed = capsys.readouterr().out
    assert "relora: " in printed and "lora: " in printed
    assert cli.main(["analyze", reference, final, "--compare", lora, "--labels", "ReLoRA", "LoRA", "--out",
                     str(out), "--no-progress"]) == 0
    with open(out / "spectra.json") as f:
        assert list(json.load(f)["runs"]) == ["ReLoRA", "LoRA"]

    # A run without a reference, and models that do not match: one line, exit 2.
    assert cli.main(["analyze", final, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "checkpoint.at_switch" in capsys.readouterr().err
    assert cli.main(["analyze", final, exported_final, "--targets", "q_proj", "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 0


def test_a_checkpoint_of_several_layers_is_analysed_a_few_tensors_at_a_time(tmp_path):
    """20m preset (4 layers; 29 MB in fp32, of which 12.6 MB in the 28 projections, the largest 0.7 MB): the peak
    of live tensor bytes of the whole analysis, from opening both checkpoints to the last SVD, stays a few of the
    largest projection; the same counter sees the whole model when merged_tensors' tensors are all held."""
    train_file, val_file = write_corpus(tmp_path, n_train=4, n_val=1)
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), **{
        "model.preset": "20m", "method": "lora", "relora.warm_start_steps": 1, "train.total_steps": 2,
        "schedule.warmup_steps": 1, "schedule.switch_warmup_steps": 0, "train.eval_every": 0,
        "train.output_dir": str(tmp_path / "run")})
    out = run(cfg)
    reference, final = checkpoint.reference_checkpoint(out), checkpoint.find_checkpoint(out)

    with LiveBytes() as live:
        held = list(merged_tensors(final))
    model_bytes = sum(t.numel() * 4 for _, t in held)
    largest = max(t.numel() * 4 for name, t in held if name.endswith("proj.weight"))
    projections = sum(t.numel() * 4 for name, t in held if name.endswith("proj.weight"))
    del held
    assert live.peak >= model_bytes > 2 * projections  # the counter can fail

    with LiveBytes() as live:
        result = analyze.analyze_pair(reference, final, progress=False)
    assert len(result["entries"]) == 4 * 7
    assert live.peak < 6 * largest, (live.peak, largest)
    assert live.peak < projections / 3 < model_bytes / 6, (live.peak, projections, model_bytes)

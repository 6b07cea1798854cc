"""`relora-ds compare` with real tiny runs: the report, skipping finished variants, --variant, a diverged variant,
the epoch warning."""

import json
import math
import os

import pytest

from relora_ds import cli, trainer
from relora_ds.engine import train_module
from relora_ds.methods.relora import restart_action
from relora_ds.tools import compare
from tests.helpers.runs import SOTU, tiny_run_config, write_corpus, write_ds_config

HAS_ANALYZE = os.path.isfile(os.path.join(os.path.dirname(compare.__file__), "analyze.py"))

# 8 steps: warm start 2, merges at 4 and 6 (relora.reset_every 2), evals at 0, 4, 8.
FIELDS = {"train.total_steps": 8, "relora.warm_start_steps": 2, "relora.reset_every": 2, "train.eval_every": 4}


def write_base(tmp_path, train_file, val_file) -> str:
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), **FIELDS)
    path = str(tmp_path / "base.yaml")
    cfg.save(path)
    return path


def read_report(out) -> dict:
    with open(os.path.join(out, compare.REPORT_JSON)) as f:
        return {row["variant"]: row for row in json.load(f)["variants"]}


def test_compare_reports_the_variants_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    train_file, val_file = write_corpus(tmp_path)
    base, out = write_base(tmp_path, train_file, val_file), str(tmp_path / "cmp")
    assert cli.main(["compare", "--config", base, "--variants", "full,lora,relora", "--out", out]) == 0
    rows = read_report(out)
    assert list(rows) == ["full", "lora", "relora"]
    for name, row in rows.items():
        assert row["status"] == "finished" and row["steps"] == 8, row
        assert row["eval_step"] == 8 and 0 < row["eval_loss"] < 20 and row["train_loss"] > 0, row
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]), rel=1e-9)
        assert row["tokens_per_s"] > 0 and 0 < row["epochs"] < 1  # the corpus holds more than 8 steps of tokens
        assert row["tokens_seen"] == 8 * 2 * 32
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["relora"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["relora"]["restarts"] == len([t for t in range(8) if restart_action(t, 2, 2, 2)[0]]) == 2
    assert rows["full"]["restarts"] == rows["lora"]["restarts"] == 0
    assert rows["full"]["overrides"] == {"method": "full", "relora.warm_start_steps": 0,
                                         "checkpoint.reference_step": 2}
    from relora_ds.engine import checkpoint

    assert checkpoint.reference_checkpoint(os.path.join(out, "full")).endswith(checkpoint.tag_for(2))
    md = open(os.path.join(out, compare.REPORT_MD)).read()
    for name in rows:
        assert f"| `{name}` | finished | {rows[name]['eval_loss']:.4f} |" in md
    assert os.path.getsize(os.path.join(out, compare.REPORT_PNG)) > 10_000
    assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: compare")]
    if HAS_ANALYZE:  # the spectra (relora_ds/tools/analyze.py)
        for row in rows.values():
            assert isinstance(row["num_above_0_1"], int), row
            assert set(row["num_above_0_1_by_projection"]) >= {"q_proj", "down_proj"}
        assert rows["full"]["num_above_0_1"] > rows["lora"]["num_above_0_1"]  # 6 full-rank steps from step 2
        assert os.path.isfile(os.path.join(out, "spectra.png")) and os.path.isfile(os.path.join(out, "spectra.json"))

    # The same command again trains nothing (each variant has its result.json) and rewrites the same report.
    mtimes = {n: os.stat(os.path.join(out, n, compare.RESULT_FILE)).st_mtime_ns for n in rows}
    monkeypatch.setattr(trainer, "train", lambda cfg, **_: pytest.fail(f"trained {cfg.train.output_dir} again"))
    assert cli.main(["compare", "--config", base, "--variants", "full,lora,relora", "--out", out]) == 0
    assert {n: os.stat(os.path.join(out, n, compare.RESULT_FILE)).st_mtime_ns for n in rows} == mtimes
    assert read_report(out) == rows
    assert "not run again" in capsys.readouterr().out


def test_one_variant_a_diverged_one_and_the_epoch_warning(tmp_path, monkeypatch, capsys):
    """--variant lora runs lora alone and writes no report; on a corpus smaller than the run, the epoch warning.
    Then relora's loss turns NaN at step 3 (a weight set to NaN before the step): the plain command records it as
    diverged, runs lora_warm after it in the same process, does not rerun lora, and writes the report."""
    import gzip

    _, val_file = write_corpus(tmp_path, n_train=1, n_val=1)
    with gzip.open(os.path.join(SOTU, "train.jsonl.gz"), "rt") as f:
        text = json.loads(f.readline())["text"][:1200]  # a few hundred tokens: under 8 steps of 2 x 32
    train_file = tmp_path / "small.jsonl"
    train_file.write_text(json.dumps({"text": text}) + "\n")
    base, out = write_base(tmp_path, str(train_file), val_file), str(tmp_path / "cmp")
    args = ["compare", "--config", base, "--variants", "relora,lora_warm,lora", "--out", out]

    assert cli.main(args + ["--variant", "lora"]) == 0
    assert sorted(os.listdir(out)) == ["lora"]
    lora = compare.read_result(os.path.join(out, "lora"))
    assert lora["status"] == "finished" and lora["epochs"] > 1
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("warning")] == [compare.epoch_warning(lora)]

    assert cli.main(args + ["--report"]) == 0  # report only: relora not run yet
    assert read_report(out)["relora"]["status"] == "not run"

    trained, real_train, real_step = [], trainer.train, train_module.train_step

    def train(cfg, **kwargs):
        trained.append(os.path.basename(cfg.train.output_dir))
        return real_train(cfg, **kwargs)

    def nan_at_step_3(engine, batches, grad_accum, **kwargs):
        if kwargs["step"] == 3 and trained[-1] == "relora":
            engine.module.model.norm.weight.data.fill_(float("nan"))
        return real_step(engine, batches, grad_accum, **kwargs)

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(train_module, "train_step", nan_at_step_3)
    assert cli.main(args) == 0
    assert trained == ["relora", "lora_warm"]
    rows = read_report(out)
    assert rows["relora"]["status"] == "diverged" and rows["relora"]["diverged_at"] == 3
    assert "loss is not finite" in rows["relora"]["error"] and rows["relora"]["steps"] == 2
    assert rows["lora"]["status"] == rows["lora_warm"]["status"] == "finished"
    assert rows["lora_warm"]["trainable_params"] == rows["lora"]["trainable_params"] > 0
    md = open(os.path.join(out, compare.REPORT_MD)).read()
    assert f"| `relora` | diverged at step 3 | {rows['relora']['eval_loss']:.4f} (step 0) |" in md and "⚠" in md
    assert compare.epoch_warning(lora) in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, compare.REPORT_PNG))


def test_seeds_run_each_variant_per_seed_and_report_mean_and_sd(tmp_path):
    train_file, val_file = write_corpus(tmp_path)
    base, out = write_base(tmp_path, train_file, val_file), str(tmp_path / "cmp")
    assert cli.main(["compare", "--config", base, "--variants", "lora", "--seeds", "3,4", "--out", out]) == 0
    with open(os.path.join(out, compare.REPORT_JSON)) as f:
        report = json.load(f)
    runs = {(row["variant"], row["seed"]): row for row in report["variants"]}
    assert list(runs) == [("lora", 3), ("lora", 4)]
    assert runs["lora", 3]["eval_loss"] != runs["lora", 4]["eval_loss"]  # the seed reached the runs
    for seed in (3, 4):
        assert compare.read_result(os.path.join(out, f"seed{seed}", "lora"))["config"]["train"]["seed"] == seed
    [by_variant] = report["by_variant"]
    losses = [runs["lora", s]["eval_loss"] for s in (3, 4)]
    assert by_variant["seeds"] == [3, 4] and by_variant["not_finished"] == []
    assert by_variant["eval_loss"] == pytest.approx([sum(losses) / 2, abs(losses[0] - losses[1]) / math.sqrt(2)])
    md = open(os.path.join(out, compare.REPORT_MD)).read()
    mean, sd = by_variant["eval_loss"]
    assert f"| `lora` | 2 | {mean:.4f} ± {sd:.4f} |" in md and "| `lora` seed 4 | finished |" in md
    # a second call finds both runs finished; a --set of the seed beside --seeds is refused in one line
    assert cli.main(["compare", "--config", base, "--variants", "lora", "--seeds", "3,4", "--out", out]) == 0
    with pytest.raises(compare.CompareError, match=r"^--set train.seed: --seeds sets it for every run"):
        compare.compare(base, ["lora"], out, ["train.seed=5"], seeds=[3])

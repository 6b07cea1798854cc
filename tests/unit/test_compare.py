"""`relora-ds compare` without training: the variants' configs, --set precedence, the one-line errors, the report."""

import json
import os

import pytest

from relora_ds import cli, methods
from relora_ds.config import load_config
from relora_ds.tools import compare

BASE = {"method": "relora", "relora": {"rank": 4, "warm_start_steps": 20, "reset_every": 20},
        "schedule": {"warmup_steps": 10, "restart_warmup_steps": 5},
        "train": {"total_steps": 100, "eval_every": 50, "seed": 7}}


def write_base(tmp_path, **sections) -> str:
    raw = {k: {**v, **sections.get(k, {})} if isinstance(v, dict) else sections.get(k, v) for k, v in BASE.items()}
    raw.update({k: v for k, v in sections.items() if k not in raw})
    path = tmp_path / "base.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return str(path)


def configs(tmp_path, overrides=(), names=tuple(compare.VARIANTS)):
    base = compare.base_config(write_base(tmp_path), overrides)
    return {n: compare.variant_config(base, n, str(tmp_path / "out" / n)) for n in names}


def test_variants_change_only_their_own_fields(tmp_path):
    cfgs = configs(tmp_path)
    base = load_config(write_base(tmp_path))
    r = {n: c.relora for n, c in cfgs.items()}
    m = {n: c.method for n, c in cfgs.items()}
    assert (m["full"], r["full"].warm_start_steps, cfgs["full"].checkpoint.reference_step) == ("full", 0, 20)
    assert (m["lora"], r["lora"].warm_start_steps) == ("lora", 0)
    assert (m["lora_warm"], r["lora_warm"].warm_start_steps) == ("lora", 20)
    assert (m["no_reset"], r["no_reset"].optimizer_reset) == ("relora", "none")
    assert (m["no_warm"], r["no_warm"].warm_start_steps) == ("relora", 0)
    assert cfgs["no_jagged"].schedule.kind == "cosine"
    assert (m["galore"], r["galore"].warm_start_steps, cfgs["galore"].checkpoint.reference_step) == ("galore", 0, 20)
    assert cfgs["relora"].relora == base.relora and cfgs["relora"].schedule == base.schedule
    for name, cfg in cfgs.items():  # equal steps, data, seed, model; compare's own keys
        assert (cfg.train.total_steps, cfg.train.seed, cfg.data, cfg.model) == (100, 7, base.data, base.model)
        assert cfg.train.output_dir == str(tmp_path / "out" / name)
        assert (cfg.train.resume, cfg.checkpoint.at_switch, cfg.checkpoint.save_final) == ("auto", True, True)


def test_set_edits_the_base_and_a_variants_own_fields_win(tmp_path):
    cfgs = configs(tmp_path, ["schedule.lr=0.01", "relora.warm_start_steps=40", "relora.optimizer_reset=random"])
    assert {c.schedule.lr for c in cfgs.values()} == {0.01}
    assert cfgs["full"].checkpoint.reference_step == 40  # derived from the edited base
    assert cfgs["lora_warm"].relora.warm_start_steps == cfgs["relora"].relora.warm_start_steps == 40
    assert cfgs["lora"].relora.warm_start_steps == cfgs["no_warm"].relora.warm_start_steps == 0
    assert cfgs["relora"].relora.optimizer_reset == "random"
    assert cfgs["no_reset"].relora.optimizer_reset == "none"  # its defining key
    for key in ("train.output_dir=x", "train.resume=true", "checkpoint.at_switch=false"):
        with pytest.raises(compare.CompareError, match=f"--set {key.split('=')[0]}: relora-ds compare sets it"):
            compare.base_config(write_base(tmp_path), [key])


def test_no_jagged_has_no_rewarmup_but_still_merges_and_resets(tmp_path):
    cfgs = configs(tmp_path, names=("relora", "no_jagged"))
    jagged, plain = (methods.from_config(cfgs[n]) for n in ("relora", "no_jagged"))
    # After the first warm-up: only down, but for the warm-up that the switch (at 20) starts, as relora's does.
    lrs = [plain.lr_multiplier(t) for t in range(10, 100)]
    switch_warmup = cfgs["no_jagged"].schedule.warmup_steps
    after_switch = lrs[20 + switch_warmup - 10:]
    assert all(b <= a for a, b in zip(lrs[:20 - 10], lrs[1:20 - 10])) and all(b <= a for a, b in zip(after_switch,
                                                                                                      after_switch[1:]))
    assert [plain.lr_multiplier(t) for t in range(20, 20 + switch_warmup + 1)] == \
        [jagged.lr_multiplier(t) for t in range(20, 20 + switch_warmup + 1)]
    # ReLoRA re-warms from 0 at its restart, cosine does not
    assert jagged.lr_multiplier(40) == 0.0 and plain.lr_multiplier(40) > 0.5
    assert [t for t in range(100) if plain.restart_due(t)] == [40, 60, 80]
    assert all(plain._action(t) == (True, True) for t in range(100) if plain.restart_due(t))  # each merge resets too


@pytest.mark.parametrize("sections, field", [
    ({"method": "lora"}, "method"),
    ({"relora": {"warm_start_steps": 0}}, "relora.warm_start_steps"),
    ({"train": {"eval_every": 0}}, "train.eval_every"),
])
def test_base_config_errors_are_one_line_naming_the_field(tmp_path, capsys, sections, field):
    base = write_base(tmp_path, **sections)
    assert cli.main(["compare", "--config", base, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}:"), err
    assert not (tmp_path / "out").exists()


def test_bad_variant_names_list_the_valid_ones(tmp_path, capsys):
    base = write_base(tmp_path)
    valid = ", ".join(compare.VARIANTS)
    for args, expected in ((["--variants", "full,bogus"], f"error: --variants: unknown variant 'bogus' (valid: {valid})"),
                           (["--variant", "bogus"], f"error: --variant: unknown variant 'bogus' (valid: {valid})"),
                           (["--variant", "no_warm"], "error: --variant 'no_warm': not among --variants "
                                                      "(full, lora, lora_warm, relora)")):
        assert cli.main(["compare", "--config", base, "--out", str(tmp_path / "out"), *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_a_result_made_with_another_config_is_refused(tmp_path):
    cfg = configs(tmp_path, names=("lora",))["lora"]
    os.makedirs(cfg.train.output_dir)
    other = cfg.to_dict()
    other["schedule"]["lr"] = 0.5
    other["log"]["progress"] = not cfg.log.progress  # logging does not count
    other["data"]["skip"] = ["4:2"]  # nor what a rewind (train.nonfinite_rewinds) wrote into config.yaml
    with open(os.path.join(cfg.train.output_dir, compare.RESULT_FILE), "w") as f:
        json.dump({"status": "finished", "config": other}, f)
    with pytest.raises(compare.CompareError, match=r"variant lora: .*result.json was made with another config "
                                                   r"\(schedule.lr 0.5 there, 0.001 here\)"):
        compare.check_same_config("lora", cfg)
    other["schedule"]["lr"] = cfg.schedule.lr
    with open(os.path.join(cfg.train.output_dir, compare.RESULT_FILE), "w") as f:
        json.dump({"status": "finished", "config": other}, f)
    compare.check_same_config("lora", cfg)


def test_markdown_table_of_a_diverged_variant():
    message = ("training stopped at step 12: the loss is not finite on rank(s) 0; nothing was stepped and the newest "
               "complete checkpoint is kept (lower schedule.lr, ...)")
    row = dict(variant="no_jagged", description="d", overrides={"schedule.kind": "cosine"}, status="diverged",
               diverged_at=12, error=message, steps=11, total_steps=20, eval_step=10, eval_loss=4.25, eval_perplexity=70.1,
               train_loss=4.5, trainable_params=None, tokens_per_s=1234.4, restarts=1, epochs=1.5,
               train_tokens=100, num_above_0_1=None)
    md = compare.markdown([row], base_path="base.yaml", overrides=["schedule.lr=0.01"], notes=["n1"],
                          spectra={"png": None})
    line = next(l for l in md.splitlines() if l.startswith("| `no_jagged`"))
    assert line == ("| `no_jagged` | diverged at step 12 | 4.2500 (step 10) | 70.10 | 4.5000 | — | — | 1,234 | 1 | "
                    "1.50 ⚠ | — |")
    assert "`--set schedule.lr=0.01`" in md and "- `no_jagged`: d (schedule.kind=cosine)" in md and "- n1" in md
    assert compare.epoch_warning(row).startswith("warning: compare: variant no_jagged passed one epoch")
    assert compare.epoch_warning({**row, "epochs": 0.9}) is None


def test_seeds_parse_and_refuse_in_one_line():
    assert compare.parse_seeds("1, 2,3,2") == [1, 2, 3]
    for bad in ("", "1,x", "-1", "1.5"):
        with pytest.raises(compare.CompareError, match=r"^--seeds: a comma-separated list of non-negative integers"):
            compare.parse_seeds(bad)


def test_seed_rows_take_mean_and_sd_of_finished_runs_only():
    def run(seed, loss, status="finished"):
        return dict(variant="relora", seed=seed, status=status, eval_loss=loss, eval_perplexity=None,
                    train_loss=loss + 1, tokens_per_s=10.0, num_above_0_1=None, trainable_params=5,
                    optimizer_state_bytes=40, restarts=2)

    [row] = compare.seed_rows([run(1, 2.0), run(2, 4.0), run(3, 9.0, "diverged")])
    assert row["seeds"] == [1, 2] and row["not_finished"] == [3]
    assert row["eval_loss"] == pytest.approx([3.0, 2 ** 0.5]) and row["eval_perplexity"] is None
    assert compare.seed_rows([run(1, 2.0)])[0]["train_loss"] == [3.0, None]

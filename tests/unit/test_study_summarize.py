"""benchmarks/study/summarize.py: collects compare reports into one table, ablations beside the base."""

import importlib.util
import json
import os

import pytest

from tests.helpers import ROOT


def _load(script: str = "summarize"):
    """benchmarks/study/<script>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"study_{script}",
                                                  os.path.join(ROOT, "benchmarks", "study", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variant(name, ppl, **extra):
    return {"variant": name, "status": "finished", "eval_loss": 1.0, "eval_perplexity": ppl,
            "trainable_params": 10, "restarts": 2, "epochs": 0.6, "num_above_0_1": 5, **extra}


def _report(directory, variants):
    os.makedirs(directory)
    with open(os.path.join(directory, "compare.json"), "w") as f:
        json.dump({"variants": variants, "notes": []}, f)
    with open(os.path.join(directory, "compare.md"), "w") as f:
        f.write("# x\n")


def test_tables_and_deltas(tmp_path):
    summarize = _load()
    runs, out = tmp_path / "runs", tmp_path / "out"
    _report(runs / "main", [_variant("lora_warm", 80.0), _variant("relora", 83.5)])
    _report(runs / "lr-2x", [_variant("lora_warm", 78.0), _variant("relora", 90.0, status="diverged", diverged_at=7)])
    assert summarize.main(["--runs", str(runs), "--out", str(out)]) == 0
    text = (out / "study.md").read_text()
    assert "| lr-2x | `lora_warm` | finished | 1.0000 | 78.00 | -2.00 |" in text
    assert "| lr-2x | `relora` | diverged at 7 |" in text and "+6.50" in text
    assert "Not run yet: base-rerun, lr-1.5x, cycle-100" in text
    assert (out / "main-compare.md").is_file() and (out / "lr-2x-compare.json").is_file()


def test_no_main_report_is_one_line(tmp_path, capsys):
    assert _load().main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_galore_table_sits_beside_the_switch_study(tmp_path):
    """summarize_galore.py: GaLore's seeds from its compare runs, the other rows from the committed switch study,
    each with its optimizer-state bytes; an unfinished seed is left out of the mean."""
    summarize_galore = _load("summarize_galore")
    runs, out = tmp_path / "runs", tmp_path / "out"
    _report(runs / "galore-seed1", [_variant("galore", 120.0, train_loss=4.9)])
    _report(runs / "galore-seed2", [_variant("galore", 124.0, train_loss=5.1)])
    _report(runs / "galore-seed3", [_variant("galore", 500.0, train_loss=9.0, status="unfinished")])
    with open(runs / "optimizer_state.json", "w") as f:
        json.dump({"full": 2 * 2**20, "lora_warm": 2**20, "relora": 2**20, "galore": 3 * 2**19}, f)
    assert summarize_galore.main(["--runs", str(runs), "--out", str(out)]) == 0
    rows = json.loads((out / "galore.json").read_text())["rows"]
    assert rows["galore"]["perplexity"] == {"1": 120.0, "2": 124.0} and rows["galore"]["ppl_mean"] == 122.0
    assert rows["full"]["ppl_n"] == 3 and rows["full"]["optimizer_state_bytes"] == 2 * 2**20
    text = (out / "galore.md").read_text()
    assert "| `galore` | 120.00 | 124.00 | — | 122.00 ± 2.83 (n=2) | 5.0000 | 1.5 MiB |" in text
    assert (out / "galore-seed1-compare.json").is_file()


def test_switch_table_pairs_the_modes_by_seed(tmp_path):
    """summarize_switch.py: each mode's seeds, restart minus continue per seed, the reports copied beside."""
    summarize_switch = _load("summarize_switch")
    runs, out = tmp_path / "runs", tmp_path / "out"
    _report(runs / "full-seed1", [_variant("full", 119.0, train_loss=4.8)])
    _report(runs / "restart-seed1", [_variant("lora_warm", 129.0, train_loss=4.9), _variant("relora", 134.0, train_loss=5.0)])
    _report(runs / "continue-seed1", [_variant("lora_warm", 133.0, train_loss=4.9), _variant("relora", 139.0, train_loss=5.0)])
    assert summarize_switch.main(["--runs", str(runs), "--out", str(out)]) == 0
    paired = json.loads((out / "switch.json").read_text())["paired"]
    assert paired["lora_warm"]["restart_minus_continue"] == {"1": -4.0} and paired["relora"]["mean"] == -5.0
    assert "`lora_warm`: seed 1: -4.00" in (out / "switch.md").read_text()
    assert sorted(p.name for p in out.glob("*-compare.md")) == ["continue-seed1-compare.md", "full-seed1-compare.md",
                                                                "restart-seed1-compare.md"]


def test_base_dtype_table_pairs_seeds_with_the_fp32_twin(tmp_path, capsys):
    """summarize_base_dtype.py: per W its seeds, mean ± sd, the paired difference from the fp32 twin and each merge's
    rounding error, share kept and drift (means over seeds); an unfinished seed is left out."""
    summarize = _load("summarize_base_dtype")
    runs, out = tmp_path / "runs", tmp_path / "out"
    ppl = {"fp32": {1: 100.0, 2: 104.0}, "int8-stochastic": {1: 101.0, 2: 106.0}, "bf16-nearest": {1: 100.5}}
    for w, seeds in ppl.items():
        for seed, value in seeds.items():
            run = runs / w / f"seed{seed}" / "relora"
            os.makedirs(run)
            (run / "result.json").write_text(json.dumps({"status": "finished", "eval_perplexity": value,
                                                         "train_loss": 5.0, "tokens_per_s": 1000.0}))
            records = [{"step": 300, "event": "restart", "merge_error": 0.1 * seed, "merge_kept": 1.0,
                        "drift": 0.01 * seed}, {"step": 400, "event": "restart", "merge_error": 0.2, "merge_kept": 0.9}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    unfinished = runs / "int8-nearest" / "seed1" / "relora"
    os.makedirs(unfinished)
    (unfinished / "result.json").write_text(json.dumps({"status": "diverged"}))
    assert summarize.main(["--runs", str(runs), "--out", str(out)]) == 0
    rows = json.loads((out / "base_dtype.json").read_text())["rows"]
    assert rows["int8-stochastic"]["ppl"] == [103.5, pytest.approx(3.5355, abs=1e-4)]
    assert rows["int8-stochastic"]["vs_twin"] == [1.5, pytest.approx(0.7071, abs=1e-4)]  # +1 and +2, paired
    assert rows["int8-nearest"]["perplexity"] == {}
    assert rows["fp32"]["merges"][0] == {"merge_error": pytest.approx(0.15), "merge_kept": 1.0,
                                         "drift": pytest.approx(0.015), "step": 300}
    assert rows["fp32"]["merges"][1]["drift"] is None
    text = (out / "base_dtype.md").read_text()
    assert "| int8-stochastic | 101.00 | 106.00 | 103.50 ± 3.54 (n=2) | +1.50 ± 0.71 | +2.99% | 5.0000 |" in text
    assert summarize.main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: no finished fp32 twin")

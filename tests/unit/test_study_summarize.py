"""benchmarks/study/summarize.py: collects compare reports into one table, ablations beside the base."""

import importlib.util
import json
import os

from tests.helpers import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("study_summarize",
                                                  os.path.join(ROOT, "benchmarks", "study", "summarize.py"))
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

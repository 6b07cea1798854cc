"""`relora-ds` subcommands: help texts, validate-config, and bad input → one clear line, exit 2, no step run."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from relora_ds import cli
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_of_every_subcommand_has_help():
    parsers = list(_all_parsers(cli.build_parser()))
    names = {p.prog.split(" ", 1)[-1] for p in parsers}
    assert {"train", "validate-config", "tokenizer train", "pretokenize", "export", "eval", "demo"} <= names
    for parser in parsers:
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_train_and_demo_take_both_spellings_of_the_run_directory():
    parser = cli.build_parser()
    for command in (["train", "--config", "x.yaml"], ["demo"]):
        for flag in ("--output-dir", "--output_dir"):
            assert parser.parse_args([*command, flag, "runs/x"]).output_dir == "runs/x", (command, flag)


def test_python_m_help_runs():
    result = subprocess.run([sys.executable, "-m", "relora_ds", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--deepspeed_config" in result.stdout and "--local_rank" in result.stdout


def test_validate_config_prints_resolved_or_errors(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("relora:\n  rank: 8\n  reset_every: 100\n")
    assert cli.main(["validate-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "rank: 8" in out and "merge_every: 100" in out  # resolved
    bad = tmp_path / "bad.yaml"
    bad.write_text("relora:\n  rnk: 8\n  prune_ratio: 1.5\n")
    assert cli.main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'relora.rnk' (did you mean 'relora.rank'?)" in err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli_corpus")
    return write_corpus(directory, n_train=4, n_val=1)


def _train(tmp_path, capsys, corpus, ds_config=None, **fields):
    train_file, val_file = corpus
    cfg = tiny_run_config(tmp_path, train_file, val_file, ds_config or write_ds_config(tmp_path), **fields)
    path = tmp_path / "run.yaml"
    cfg.save(str(path))
    code = cli.main(["train", "--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert not os.path.isdir(os.path.join(cfg.train.output_dir, "checkpoints")), "a step ran"
    return code, err


def test_deepspeed_json_disagreeing_with_the_run_is_refused(tmp_path, capsys, corpus):
    ds = tmp_path / "sched.json"
    config = json.load(open(write_ds_config(tmp_path)))
    config["scheduler"] = {"type": "WarmupLR"}
    ds.write_text(json.dumps(config))
    code, err = _train(tmp_path, capsys, corpus, ds_config=str(ds))
    assert code == 2 and len(err) == 1
    assert "sched.json: remove the 'scheduler' section" in err[0]


def test_output_dir_with_another_run_is_refused(tmp_path, capsys, corpus):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {}\n")
    code, err = _train(tmp_path, capsys, corpus, **{"train.output_dir": str(run_dir)})
    assert code == 2 and "holds another run" in err[0] and "train.resume" in err[0]


def test_resume_without_checkpoint_is_refused(tmp_path, capsys, corpus):
    code, err = _train(tmp_path, capsys, corpus, **{"train.resume": True})
    assert code == 2 and "no complete relora-ds checkpoint found" in err[0]


def test_missing_data_file_is_refused(tmp_path, capsys, corpus):
    code, err = _train(tmp_path, capsys, corpus, **{"data.source": str(tmp_path / "missing.jsonl")})
    assert code == 2 and len(err) == 1 and "missing.jsonl" in err[0]


def test_missing_text_column_is_refused(tmp_path, capsys, corpus):
    code, err = _train(tmp_path, capsys, corpus, **{"data.text_column": "body"})
    assert code == 2 and len(err) == 1 and "body" in err[0]


def test_vocab_larger_than_embedding_is_refused(tmp_path, capsys, corpus):
    code, err = _train(tmp_path, capsys, corpus, **{"model.vocab_size": 100})
    assert code == 2 and "model.vocab_size 100 is smaller than the tokenizer's vocabulary" in err[0]


def test_seq_len_beyond_model_positions_is_refused(tmp_path, capsys, corpus):
    code, err = _train(tmp_path, capsys, corpus, **{"data.seq_len": 4096})
    assert code == 2 and "data.seq_len 4096 is longer than model.preset tiny supports (1024" in err[0]


def test_export_of_a_dir_without_checkpoint_is_refused(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete relora-ds checkpoint found" in err[0]


def test_tokenizer_train_pretokenize_train_eval_through_the_cli(tmp_path, capsys, corpus):
    """The offline pipeline a user runs: own tokenizer → packed dataset with manifest → training on it → eval;
    a manifest that disagrees with the run is refused."""
    train_file, val_file = corpus
    tok = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--files", train_file, "--out", str(tok), "--vocab-size", "512"]) == 0
    assert (tok / "tokenizer.json").is_file()
    packed = tmp_path / "packed"
    assert cli.main(["pretokenize", "--source", train_file, "--out", str(packed), "--tokenizer", str(tok),
                     "--seq-len", "32"]) == 0
    assert "sequences of 32 tokens" in capsys.readouterr().out
    manifest = json.load(open(packed / "manifest.json"))
    assert manifest["seq_len"] == 32 and manifest["num_sequences"] > 8

    def run_cfg(name, **fields):
        cfg = tiny_run_config(tmp_path, str(packed), val_file, write_ds_config(tmp_path), **{
            "data.tokenizer": str(tok), "method": "full", "relora.warm_start_steps": 0,
            "train.total_steps": 3, "train.eval_every": 3, "train.output_dir": str(tmp_path / name), **fields})
        path = tmp_path / f"{name}.yaml"
        cfg.save(str(path))
        return str(path)

    assert cli.main(["train", "--config", run_cfg("bad", **{"data.seq_len": 64})]) == 2
    assert "seq_len 32 does not match data.seq_len 64" in capsys.readouterr().err
    assert cli.main(["train", "--config", run_cfg("good")]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "good"), "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["eval", str(tmp_path / "hf"), "--source", val_file, "--split", "train", "--seq-len", "32",
                     "--batch-size", "2", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "perplexity" in out


def test_the_deepspeed_launchers_leading_local_rank_is_taken_out(monkeypatch):
    """`deepspeed --module relora_ds compare ...` runs `python -m relora_ds --local_rank=N compare ...`."""
    from relora_ds import cli

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.take_launcher_local_rank(["--local_rank=3", "compare", "--out", "x"]) == ["compare", "--out", "x"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert cli.take_launcher_local_rank(["--local-rank", "2", "analyze", "r"]) == ["analyze", "r"]
    assert os.environ["LOCAL_RANK"] == "2"
    assert cli.take_launcher_local_rank(["train", "--local_rank=1"]) == ["train", "--local_rank=1"]  # its own option
    args = cli.build_parser().parse_args(cli.take_launcher_local_rank(["--local_rank=0", "compare", "--config", "b.yaml",
                                                                       "--out", "o", "--report"]))
    assert args.command == "compare" and args.report

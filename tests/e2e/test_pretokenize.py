"""`relora-ds pretokenize` at scale through the command line: --num-proc 1 and 2 write the same shards, a run trains
on a many-shard directory, bad arguments are one line (exit 2) before anything is read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from relora_ds import cli
from relora_ds.data import loader
from relora_ds.data.tokenize import load_tokenizer
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pretokenize_corpus"), n_train=6, n_val=1)


def test_num_proc_1_and_2_through_the_cli_give_the_same_shards_and_a_run_trains_on_them(tmp_path, corpus, capsys):
    train_file, val_file = corpus
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"packed{n}"
        result = subprocess.run([sys.executable, "-m", "relora_ds", "pretokenize", "--source", train_file,
                                 "--out", str(outs[n]), "--seq-len", "32", "--num-proc", str(n), "--shard-size", "8KiB"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "sequences of 32 tokens" in result.stdout and "shards) written to" in result.stdout
    manifests = {n: json.load(open(outs[n] / "manifest.json")) for n in outs}
    assert manifests[1]["shards"] == manifests[2]["shards"] and len(manifests[1]["shards"]) > 3
    assert all(s["bytes"] <= 8192 for s in manifests[1]["shards"])
    for shard in manifests[1]["shards"]:
        assert (outs[1] / shard["file"]).read_bytes() == (outs[2] / shard["file"]).read_bytes()
    tok = load_tokenizer(None)
    ds = loader.build_dataset(str(outs[2]), tokenizer=tok, seq_len=32)
    assert len(ds) == manifests[2]["num_sequences"] and ds.get_batch(np.arange(len(ds))).shape == (len(ds), 32)

    cfg = tiny_run_config(tmp_path, str(outs[2]), val_file, write_ds_config(tmp_path), **{
        "method": "full", "relora.warm_start_steps": 0, "train.total_steps": 3, "train.eval_every": 3,
        "train.output_dir": str(tmp_path / "run")})
    cfg.save(str(tmp_path / "run.yaml"))
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r and "event" not in r] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--num-proc", "0"], "error: --num-proc 0: must be a whole number >= 1 (tokenizer processes; 1 tokenizes in "
                          "this process)"),
    (["--num-proc", "-3"], "error: --num-proc -3: must be a whole number >= 1"),
    (["--shard-size", "lots"], "error: --shard-size 'lots': not a size; expected a positive number of bytes"),
    (["--shard-size", "0GB"], "error: --shard-size '0GB': not a size;"),
])
def test_bad_arguments_are_one_line_before_anything_is_read(tmp_path, corpus, capsys, args, message):
    out = tmp_path / "never"
    assert cli.main(["pretokenize", "--source", corpus[0], "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not os.path.exists(out)


def test_a_bad_record_stops_pretokenize_in_one_line_unless_skip_bad_records(tmp_path, capsys):
    words = " ".join(["the union state congress people nation peace war law year"] * 3)
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"text": words}) + "\n{broken\n" + json.dumps({"text": words}) + "\n")
    args = ["pretokenize", "--source", str(corpus), "--seq-len", "8", "--num-proc", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "stopped")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {corpus} line 2: not valid JSON"), err
    assert not (tmp_path / "stopped" / "manifest.json").exists()
    assert cli.main([*args, "--out", str(tmp_path / "skipped"), "--skip-bad-records"]) == 0
    assert "bad.jsonl line 2" in capsys.readouterr().err
    assert json.load(open(tmp_path / "skipped" / "manifest.json"))["num_documents"] == 2

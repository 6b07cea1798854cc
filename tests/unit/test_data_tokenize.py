"""tokenize.py: the shipped tokenizer, training a byte-level BPE dir, loading errors, the vocab hash."""

import json
import os

import pytest

from relora_ds.data import DataError
from relora_ds.data.tokenize import SHIPPED_TOKENIZER, encode_batch, load_tokenizer, train_tokenizer, vocab_hash


@pytest.fixture(scope="module")
def shipped():
    return load_tokenizer(None)


def test_shipped_tokenizer_is_the_default_and_complete(shipped):
    assert len(shipped) == 8192
    assert (shipped.bos_token, shipped.eos_token, shipped.unk_token, shipped.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({shipped.bos_token_id, shipped.eos_token_id, shipped.unk_token_id, shipped.pad_token_id}) == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(SHIPPED_TOKENIZER, name))
    text = "Fellow-Citizens of the Senate and House of Representatives: naïve 1790\n"
    ids = encode_batch(shipped, [text])[0]
    assert shipped.eos_token_id not in ids and shipped.bos_token_id not in ids  # no automatic specials
    assert shipped.decode(ids) == text  # byte-level: lossless
    assert len(ids) < len(text) / 2.5  # trained on this corpus: common words are single tokens


def test_train_tokenizer_writes_a_loadable_hf_dir(tmp_path, shipped):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                              for i in range(50)))
    (tmp_path / "more.txt").write_text("another document, plain text")
    out = train_tokenizer([str(corpus), str(tmp_path / "more.txt")], str(tmp_path / "tok"), vocab_size=300,
                          text_column="body")
    tok = load_tokenizer(out)
    assert 260 < len(tok) <= 300
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok.decode(encode_batch(tok, ["the quick fox"])[0]) == "the quick fox"
    assert vocab_hash(tok) != vocab_hash(shipped)
    assert vocab_hash(tok) == vocab_hash(load_tokenizer(out))
    config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too


def test_train_tokenizer_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "tok"))
    with pytest.raises(DataError, match="vocab_size 100: must be at least 260"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "tok"), vocab_size=100)
    with pytest.raises(DataError, match="no files given"):
        train_tokenizer([], str(tmp_path / "tok"))


def test_load_tokenizer_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data\.tokenizer './no/such/dir': not a directory") as info:
        load_tokenizer("./no/such/dir")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a loadable Hugging Face tokenizer directory"):
        load_tokenizer(str(tmp_path / "junk"))
    with pytest.raises(DataError, match=r"data\.tokenizer 'someone/no-such-tokenizer': could not be found locally "
                                        r"and the Hugging Face hub is unreachable") as info:
        load_tokenizer("someone/no-such-tokenizer")
    assert "\n" not in str(info.value)

"""packing.py: EOS per document, concatenation, fixed windows, dropped tail, exact resume positions."""

import random

import pytest

from relora_ds.data.packing import pack_documents, pack_with_positions

EOS = 99


def _docs(seed: int, n: int = 30, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 90) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


def test_windows_are_the_eos_separated_concatenation_without_padding():
    docs = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10, 11]]
    windows = list(pack_documents(docs, seq_len=4, eos_id=EOS))
    # stream: 1 2 3 E 4 E E 5 6 7 8 9 10 11 E  (15 tokens) -> 3 windows, 3-token tail dropped
    assert windows == [[1, 2, 3, EOS], [4, EOS, EOS, 5], [6, 7, 8, 9]]
    assert all(len(w) == 4 for w in windows)


@pytest.mark.parametrize("seq_len", [1, 3, 16, 64])
def test_matches_a_reference_concatenation(seq_len):
    docs = _docs(seed=seq_len)
    stream = [t for d in docs for t in d + [EOS]]
    expected = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    assert list(pack_documents(docs, seq_len, EOS)) == expected


def test_too_little_text_gives_no_window_and_input_is_not_modified():
    docs = [[1, 2], [3]]
    assert list(pack_documents(docs, seq_len=6, eos_id=EOS)) == []
    assert docs == [[1, 2], [3]]
    with pytest.raises(ValueError, match="seq_len 0"):
        list(pack_documents(docs, seq_len=0, eos_id=EOS))


@pytest.mark.parametrize("seq_len", [5, 16, 50])
def test_resuming_from_any_yielded_position_continues_exactly(seq_len):
    docs = _docs(seed=7, n=25, max_len=60)  # documents both shorter and longer than a window
    full = list(pack_with_positions(docs, seq_len, EOS))
    assert len(full) > 5
    for k, (_, position) in enumerate(full):
        doc, offset = position
        resumed = [w for w, _ in pack_with_positions(docs[doc:], seq_len, EOS, start=position)]
        assert resumed == [w for w, _ in full[k + 1:]], (k, position)
        assert 0 <= offset <= len(docs[doc]) if doc < len(docs) else offset == 0

"""Pack tokenized documents into fixed-length training sequences (pure functions, no I/O).

The layout: every document gets one EOS appended, documents are concatenated in order, and the stream
is cut into consecutive, non-overlapping windows of exactly `seq_len` tokens. No padding; the final
partial window is dropped. A window is both the input and the labels of one training sequence
(labels = input_ids: Hugging Face's LlamaForCausalLM shifts them inside its loss, so a window of
seq_len tokens trains seq_len - 1 next-token predictions). Windows may start mid-document and span
document boundaries; attention is not masked at the EOS (the usual pretraining packing).
"""

from collections.abc import Iterable, Iterator


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[list[int]]:
    """Yield seq_len-token windows of the EOS-separated concatenation of `token_lists`."""
    for window, _ in pack_with_positions(token_lists, seq_len, eos_id):
        yield window


def pack_with_positions(token_lists: Iterable[list[int]], seq_len: int, eos_id: int,
                        start: tuple[int, int] = (0, 0)) -> Iterator[tuple[list[int], tuple[int, int]]]:
    """Like pack_documents, also yielding where the *next* window starts: (document index, token offset).

    `token_lists` are the documents from index start[0] on, the first of which is entered at token
    offset start[1] (offsets count the appended EOS as the document's last token). Feeding the yielded
    position back as `start` (with the documents from that index) continues the same windows exactly.
    (The sharded stream packs the same layout incrementally and resumes from its saved buffer: stream.py.)
    """
    if seq_len < 1:
        raise ValueError(f"seq_len {seq_len}: must be at least 1")
    doc_index, first_offset = start
    buf: list[int] = []
    for tokens in token_lists:
        doc = list(tokens) + [eos_id]
        if first_offset:
            doc_len, doc = len(doc), doc[first_offset:]
            first_offset = 0
        else:
            doc_len = len(doc)
        buf.extend(doc)
        i = 0
        while len(buf) - i >= seq_len:
            window = buf[i:i + seq_len]
            i += seq_len
            remaining = len(buf) - i  # all of it from this document (earlier ones are < seq_len)
            yield window, (doc_index + 1, 0) if remaining == 0 else (doc_index, doc_len - remaining)
        buf = buf[i:]
        doc_index += 1


"""Shared test helpers: a tiny LLaMA, a tiny in-process text corpus as byte tokens, and batches of it.

    model = tiny_model(seed=0)                      # LlamaForCausalLM, preset "tiny", vocab 256, sdpa
    for ids in token_batches(8, 64, seed=0): ...    # endless (8, 64) LongTensors of byte tokens
    loss = lm_loss(model, ids)

No files, no tokenizer, no network: the corpus is a few paragraphs kept in this module.
"""

import torch

from relora_ds.model.build import build_model

BYTE_VOCAB = 256

# A few paragraphs of plain English, written for these tests. Repetitive enough that a tiny model
# learns it within a few hundred steps, varied enough that the loss does not collapse to zero at once.
TINY_TEXT = """\
The river runs past the old mill and under the stone bridge. In the morning the baker opens the
shop by the bridge and the smell of bread drifts over the water. Children walk to school along the
river, and the ducks follow them for a while before they turn back to the reeds.
In the afternoon the wind comes up from the valley. The miller closes the upper windows, the baker
sells the last loaves, and the fishermen pull their boats onto the bank. The water is grey and
quick, and the bridge hums when a cart rolls over it.
In the evening the lamps are lit one by one. The baker counts the coins, the miller sweeps the
floor, and the children come home along the river with the ducks behind them. The water is dark
and slow, and the stone bridge is quiet until the morning comes again.
"""


def corpus_tokens(text: str = TINY_TEXT) -> torch.Tensor:
    """The text as a 1-D LongTensor of byte values (0-255)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def token_batches(batch_size: int, seq_len: int, *, seed: int = 0, text: str = TINY_TEXT):
    """Endless (batch_size, seq_len) batches of random windows of the corpus, from a seeded generator."""
    tokens = corpus_tokens(text)
    if seq_len >= tokens.numel():
        raise ValueError(f"seq_len must be < the corpus length {tokens.numel()}, got {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size, 1), generator=generator)
        yield tokens[starts + offsets]


def fixed_batch(batch_size: int = 4, seq_len: int = 32, *, seed: int = 0) -> torch.Tensor:
    """One deterministic batch (for comparing outputs before/after an operation)."""
    return next(token_batches(batch_size, seq_len, seed=seed))


def tiny_model(*, seed: int = 0, vocab_size: int = BYTE_VOCAB, preset: str = "tiny",
               dtype: torch.dtype | None = None):
    """A seeded LlamaForCausalLM (preset "tiny": d=64, 2 layers, 4 heads) with SDPA attention."""
    return build_model(preset, vocab_size, attn_implementation="sdpa", dtype=dtype, seed=seed)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `model` on `ids` (labels = inputs; the model shifts them)."""
    return model(input_ids=ids, labels=ids).loss


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits.float()

"""train_module.row_loss_sums: each row's next-token loss from the logits the forward made, as the model computes it
(the trainer sums a data.mixture's per-source training loss with it), in chunks of positions."""

import pytest
import torch

from relora_ds.engine.train_module import row_loss_sums
from tests.helpers.tiny import token_batches, tiny_model


@pytest.mark.parametrize("chunk", [5, 256])
def test_row_losses_are_the_models_loss_row_by_row(chunk):
    model = tiny_model(seed=0)
    ids = next(token_batches(4, 32, seed=1))
    labels = ids.clone()
    labels[1, 10:] = -100  # ignored positions count nowhere
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        sums, tokens = row_loss_sums(out.logits, labels, chunk=chunk)
        assert tokens.tolist() == [31, 9, 31, 31]
        assert (sums.sum() / tokens.sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)
        for row in range(4):
            alone = model(input_ids=ids[row:row + 1], labels=labels[row:row + 1]).loss
            assert (sums[row] / tokens[row]).item() == pytest.approx(alone.item(), rel=1e-4)

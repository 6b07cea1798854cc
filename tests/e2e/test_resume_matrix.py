"""Resume at every event boundary on one rank (in this process): ZeRO 0-3 (one rank: a single-GPU user's ZeRO-2/3,
for offload), fp32 bitwise and bf16 within BF16_REL, and a streamed source read by two data workers. The checkpoint
at the restart step is the one that stopped every ZeRO-1/2 resume before (DeepSpeed links the loaded moments only at
its next step)."""

import pytest

from tests.helpers.resume import assert_resumed_exactly, resume_matrix
from tests.helpers.runs import write_corpus, write_ds_config

BF16_REL = 1e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_resume_matrix_one_rank(corpus, tmp_path, stage, bf16):
    ds = write_ds_config(tmp_path, stage=stage, bf16=bf16)
    results = resume_matrix(str(tmp_path), ds, f"zero{stage}", *corpus)
    assert_resumed_exactly(results, rel=BF16_REL if bf16 else 0.0)


def test_resume_matrix_streamed_with_workers(corpus, tmp_path):
    """A stream read by two data workers per rank: the data position (each reader's state and whose turn is next)
    resumes with the model at the restart and mid-cycle."""
    ds = write_ds_config(tmp_path, stage=2)
    results = resume_matrix(str(tmp_path), ds, "stream", *corpus, points=("mid_cycle", "restart"), **{
        "data.streaming": True, "data.num_workers": 2, "data.prefetch_batches": 2})
    assert_resumed_exactly(results)

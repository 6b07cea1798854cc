"""Resume at every event boundary on 2 gloo ranks, one spawn per ZeRO stage: the warm-start switch, a restart (the
restored engine has taken no optimizer step yet), one step after it, mid-cycle; fp32 bitwise, bf16 within
BF16_REL (bitwise on CPU so far; the bound leaves room for reductions that reorder). Every logged loss and gradient
norm, and every restart's merged norm and pruned fraction, equals the uninterrupted run's."""

import os

import pytest

from tests.helpers.resume import assert_resumed_exactly, resume_matrix
from tests.helpers.runs import write_corpus, write_ds_config
from tests.helpers.spawn import run_on_ranks

pytestmark = pytest.mark.slow

BF16_REL = 1e-3


def _matrix(rank, world_size, directory, stage):
    train_file, val_file = os.path.join(directory, "train.jsonl"), os.path.join(directory, "validation.jsonl")
    return {precision: resume_matrix(directory, os.path.join(directory, f"ds_stage{stage}{suffix}.json"),
                                     f"zero{stage}_{precision}", train_file, val_file)
            for precision, suffix in (("fp32", ""), ("bf16", "_bf16"))}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_matrix_two_ranks(tmp_path, stage):
    write_corpus(tmp_path)
    write_ds_config(tmp_path, stage=stage)
    write_ds_config(tmp_path, stage=stage, bf16=True)
    r0, r1 = run_on_ranks(_matrix, world_size=2, args=(str(tmp_path), stage), timeout=600)
    assert r0 == r1  # every rank logs the rank-mean loss and the same restart records
    assert_resumed_exactly(r0["fp32"])
    assert_resumed_exactly(r0["bf16"], rel=BF16_REL)

"""Resume at every event boundary on one rank (in this process): ZeRO 0-3 (one rank: a single-GPU user's ZeRO-2/3),
fp32 bitwise and bf16 within BF16_REL, ZeRO-2/3 with the optimizer offloaded to the CPU, and a streamed source read
by two data workers. The checkpoint
at the restart step is the one that stopped every ZeRO-1/2 resume before (DeepSpeed links the loaded moments only at
its next step)."""

import pytest

from tests.helpers.resume import assert_resumed_exactly, resume_matrix, run_reference
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


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_matrix_with_the_optimizer_offloaded(corpus, tmp_path, stage):
    """ZeRO-Offload (offload_optimizer: cpu; on ZeRO-3 offload_param: cpu too), how one device holds the fp32 masters
    and Adam moments (and ZeRO-3's parameters) in host memory: the restart merges and prunes them there, the run resumes exactly at the restart and one step after it, and its
    losses are the plain run's (ZeRO-3: within 1e-6)."""
    offload = {"offload_optimizer": {"device": "cpu", "pin_memory": False}}
    if stage == 3:  # and the parameters' partitions (DeepSpeed marks them 'not-nvme', once taken for NVMe)
        offload["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds = write_ds_config(tmp_path, stage=stage, zero=offload)
    results = resume_matrix(str(tmp_path), ds, f"zero{stage}_offload", *corpus, points=("restart", "after_restart"))
    assert_resumed_exactly(results)
    (tmp_path / "plain").mkdir()
    plain = run_reference(str(tmp_path), write_ds_config(tmp_path / "plain", stage=stage), f"zero{stage}", *corpus)
    offloaded = results["reference"]["losses"]
    if stage == 2:
        assert offloaded == plain["losses"]
    else:  # ZeRO-3's offloaded step adds up in another order: an fp32 ulp or so apart
        assert offloaded == pytest.approx(plain["losses"], rel=1e-6, abs=0)


def test_resume_matrix_streamed_with_workers(corpus, tmp_path):
    """A stream read by two data workers per rank: the data position (each reader's state and whose turn is next)
    resumes with the model at the restart and mid-cycle."""
    ds = write_ds_config(tmp_path, stage=2)
    results = resume_matrix(str(tmp_path), ds, "stream", *corpus, points=("mid_cycle", "restart"), **{
        "data.streaming": True, "data.num_workers": 2, "data.prefetch_batches": 2})
    assert_resumed_exactly(results)

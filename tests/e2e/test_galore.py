"""GaLore (relora_ds/methods/galore.py) through the unchanged trainer, engine, checkpoints and resume.

ZeRO-0 in fp32 resumes bitwise at any step (the projections recomputed every 3 steps, so a resume falls inside one
projection's span and across a recomputation); bf16 trains with a low-rank optimizer state; ZeRO-1 is refused
before anything is built."""

import pytest
import torch

from relora_ds import trainer
from relora_ds.errors import RunError
from tests.helpers.resume import assert_resumed_exactly, resume_matrix
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config

GALORE = {"method": "galore", "relora.warm_start_steps": 0, "galore.rank": 4, "galore.update_proj_gap": 3}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def test_galore_resumes_exactly_on_zero0(corpus, tmp_path):
    results = resume_matrix(str(tmp_path), write_ds_config(tmp_path), "galore", *corpus,
                            points=("mid_cycle", "after_restart"), **GALORE)
    assert results["reference"]["restarts"] == []  # GaLore changes no module: no switch, no merges
    assert_resumed_exactly(results, rel=0.0, restarts=())

    # Its checkpoints hold tensors only (the projections too): export reads them weights-only into a plain model.
    from transformers import AutoModelForCausalLM

    from relora_ds.engine import checkpoint
    from relora_ds.tools.export import export

    run = str(tmp_path / "galore")
    state = torch.load(f"{checkpoint.find_checkpoint(run)}/mp_rank_00_model_states.pt", weights_only=True)
    projected = [s for s in state["optimizer"]["state"].values() if "galore_ortho" in s]
    assert projected and all(s["galore_ortho"].shape[0] == 4 or s["galore_ortho"].shape[1] == 4 for s in projected)
    hf = AutoModelForCausalLM.from_pretrained(export(run, str(tmp_path / "export")))
    assert sum(p.numel() for p in hf.parameters()) > 0


def test_galore_bf16_keeps_low_rank_moments(corpus, tmp_path):
    cfg = tiny_run_config(tmp_path, *corpus, write_ds_config(tmp_path, bf16=True), **GALORE,
                          **{"train.total_steps": 6, "checkpoint.every": 3})
    summary = trainer.train(cfg, keep_engine=True)
    engine = summary["engine"]
    try:
        assert all(torch.isfinite(torch.tensor(v)) for v in summary["losses"].values())
        galore = engine.optimizer.optimizer  # DeepSpeed's bf16 wrapper at stage 0 around GaLoreAdamW
        assert type(galore).__name__ == "AdamW" and type(galore).__module__.startswith("galore_torch")
        projected = [p for group in galore.param_groups if "rank" in group for p in group["params"]]
        assert projected and all(p.dtype == torch.float32 for p in projected)  # whole fp32 masters
        for p in projected:
            moment = galore.state[p]["exp_avg"]
            assert 4 in moment.shape and moment.numel() < p.numel()  # rank 4 on one side, not a full matrix
        assert summary["trainable_params"] == summary["total_params"]  # full-rank weights, all trained
    finally:
        engine.destroy()


def test_galore_refuses_zero1_before_building(corpus, tmp_path):
    cfg = tiny_run_config(tmp_path, *corpus, write_ds_config(tmp_path, stage=1), **GALORE)
    with pytest.raises(RunError, match="^method galore: needs zero_optimization.stage 0 in the DeepSpeed JSON, got 1"):
        trainer.train(cfg)

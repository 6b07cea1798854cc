"""train.activation_checkpointing: full recomputes each decoder layer in the backward pass, selective each layer's MLP;
the losses and gradient norms are those of the run that keeps its activations (CPU fp32), through the warm-start
switch and a restart, on ZeRO-0 and ZeRO-3; a model that cannot be checkpointed is refused before anything is
built."""

import functools

import pytest

from relora_ds import trainer
from relora_ds.errors import RunError
from tests.helpers.runs import short_run_config, write_corpus, write_ds_config


@pytest.mark.parametrize("stage", [0, 3])
def test_checkpointed_run_equals_the_plain_one(tmp_path, stage):
    train_file, val_file = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=stage)
    runs = {}
    for mode in ("none", "full", "selective"):
        cfg = short_run_config(tmp_path, train_file, val_file, ds, **{
            "train.activation_checkpointing": mode, "train.output_dir": str(tmp_path / mode)})
        summary = trainer.train(cfg, keep_engine=True)
        engine = summary["engine"]
        layers = engine.module.model.layers
        runs[mode] = (summary["losses"], summary["grad_norms"], [r["step"] for r in summary["restarts"]])
        assert engine.module.is_gradient_checkpointing == (mode == "full") and len(layers) == 2
        assert isinstance(layers[0].mlp.forward, functools.partial) == (mode == "selective")
        engine.destroy()
    for mode in ("full", "selective"):
        assert runs[mode][2] == runs["none"][2] == [4]  # the switch at 2, a restart at 4: the same events
        assert runs[mode][0] == runs["none"][0]  # bitwise, every step
        assert runs[mode][1] == pytest.approx(runs["none"][1], rel=1e-6)


def test_a_model_without_checkpointing_is_refused_at_step_0(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    train_file, val_file = write_corpus(tmp_path)
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    cfg = short_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path),
                           **{"train.activation_checkpointing": "full"})
    with pytest.raises(RunError, match="^train.activation_checkpointing full: LlamaForCausalLM does not support"):
        trainer.train(cfg)

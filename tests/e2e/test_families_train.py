"""Every model family end to end in one process (tiny preset, ZeRO-0): the warm-start switch, a restart, eval and
MFU from the family's own FLOP count; the export loads in transformers with the trained model's logits (and so does
what `relora-ds eval CHECKPOINT` loads); analyze finds the family's projections. ZeRO-3 on 2 ranks:
tests/distributed/test_families_zero3.py."""

import json
import os

import pytest
import torch

from relora_ds import trainer
from relora_ds.model.families import FAMILIES
from tests.helpers.runs import read_metrics, short_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "gpt_neox": "GPTNeoXForCausalLM"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return write_corpus(directory, n_train=4, n_val=2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_restarts_exports_and_is_analysed(family, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from relora_ds.model.counts import flops_per_token
    from relora_ds.tools.analyze import analyze_run, projections
    from relora_ds.tools.eval import load_checkpoint_model
    from relora_ds.tools.export import export

    train_file, val_file = corpus
    cfg = short_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), family,
                           **{"log.peak_tflops": 1.0})
    engine = trainer.train(cfg, keep_engine=True)["engine"]
    try:
        model = engine.module
        assert type(model).__name__ == CLASSES[family]
        out = cfg.train.output_dir
        records = read_metrics(out)
        events = [(r["event"], r["step"]) for r in records if r.get("event") in ("switch", "restart", "eval")]
        assert events == [("eval", 0), ("switch", 2), ("restart", 4), ("eval", 6)]
        wrapped = sorted({n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if n.endswith(".lora_A")})
        assert wrapped == sorted(FAMILIES[family].target_modules)  # relora.target_modules: null → the family's
        full = flops_per_token(model.config, cfg.data.seq_len)["full"]
        steps = [r for r in records if "event" not in r]
        assert len(steps) == 6 and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * full / 1e12) for r in steps)

        export_dir = export(out, str(tmp_path / "export"))
        with open(os.path.join(export_dir, "config.json")) as f:
            assert json.load(f)["model_type"] == family
        hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
        assert type(hf).__name__ == CLASSES[family] and not any("lora" in n for n, _ in hf.named_parameters())
        assert hf.config.tie_word_embeddings == (family == "qwen2")
        x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            expected = model(input_ids=x).logits
            torch.testing.assert_close(hf(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
            evaluated, _, _ = load_checkpoint_model(out)  # what `relora-ds eval RUN_DIR` evaluates
            torch.testing.assert_close(evaluated(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
    finally:
        engine.destroy()

    result = analyze_run(out, progress=False)  # reference at the switch against the final checkpoint
    targets = list(FAMILIES[family].target_modules)
    assert result["targets"] == targets
    assert projections({"run": result}) == targets  # the panels in the family's own order
    assert len(result["entries"]) == hf.config.num_hidden_layers * len(targets)
    assert all(e["layer"] is not None and max(e["singular_values"]) > 0 for e in result["entries"])

"""Model families on ZeRO-3 with 2 gloo ranks (one spawn): every family's partitioned build is its unsharded build
(same seeded weights, no rank holding a whole parameter), and qwen2 (GQA, q/k/v biases, tied embeddings) trains
through the warm-start switch and a restart and exports to a model that transformers loads with the same logits."""

import os

import pytest
import torch

from relora_ds.model.families import FAMILIES
from tests.helpers.runs import ds_config, short_run_config, write_corpus, write_ds_config
from tests.helpers.spawn import run_on_ranks

pytestmark = pytest.mark.slow

VOCAB = 256


def _scenario(rank, world_size, directory):
    import deepspeed

    from relora_ds import trainer
    from relora_ds.model.build import build_model

    out = {"partitioned": {}, "same_init": {}}
    zero3 = ds_config(3)
    for family in FAMILIES:
        plain = build_model("tiny", VOCAB, family=family, attn_implementation="sdpa", seed=3)
        sharded = build_model("tiny", VOCAB, family=family, attn_implementation="sdpa", seed=3, zero3_config=zero3)
        out["partitioned"][family] = all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in sharded.parameters())
        same = True
        for (name, a), (other, b) in zip(plain.named_parameters(), sharded.named_parameters()):
            with deepspeed.zero.GatheredParameters([b]):
                same = same and name == other and torch.equal(a, b)
        out["same_init"][family] = same
        del plain, sharded

    cfg = short_run_config(directory, os.path.join(directory, "train.jsonl"),
                           os.path.join(directory, "validation.jsonl"), os.path.join(directory, "ds_stage3.json"),
                           "qwen2", **{"train.eval_every": 0, "train.output_dir": os.path.join(directory, "qwen2")})
    summary = trainer.train(cfg, keep_engine=True)
    engine = summary["engine"]
    out["losses"] = summary["losses"]
    out["restarts"] = [r["step"] for r in summary["restarts"]]
    out["wrapped"] = sum(n.endswith(".lora_A") for n, _ in engine.module.named_parameters())
    engine.eval()
    with torch.no_grad():
        x = torch.arange(32).reshape(2, 16) % 100
        out["logits"] = engine(input_ids=x).logits.float().tolist()  # plain data: tensors need the sender alive
    engine.destroy()
    return out


def test_every_family_builds_partitioned_and_qwen2_trains_and_exports_on_zero3(tmp_path):
    from transformers import AutoModelForCausalLM

    from relora_ds.tools.export import export

    write_corpus(tmp_path, n_train=4, n_val=2)
    write_ds_config(tmp_path, stage=3)
    r0, r1 = run_on_ranks(_scenario, world_size=2, args=(str(tmp_path),), timeout=400)
    for family in FAMILIES:
        assert r0["partitioned"][family] and r1["partitioned"][family], family
        assert r0["same_init"][family] and r1["same_init"][family], family
    assert r0["losses"] == r1["losses"] and sorted(r0["losses"]) == list(range(1, 7))
    assert r0["restarts"] == [4]
    assert r0["wrapped"] == 2 * 7  # the family's seven projections in both layers

    export_dir = export(str(tmp_path / "qwen2"), str(tmp_path / "export"))
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.tie_word_embeddings
    assert hf.config.num_key_value_heads == 1 and hf.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        logits = hf(input_ids=torch.arange(32).reshape(2, 16) % 100).logits
    torch.testing.assert_close(logits, torch.tensor(r0["logits"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(r1["logits"]), torch.tensor(r0["logits"]))

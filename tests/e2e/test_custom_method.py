"""The methods seam: a method that is not one of the shipped three plugs into the unchanged trainer.

`OnlineConstant` (defined here, as a researcher would in their own file) merges every 3 steps after the switch
without ever resetting the optimizer (online ReLoRA) and trains at a constant LR after the first warm-up. The
trainer is asked, never told: the restart events, the logged LR and the export follow the method.
"""

import torch

from relora_ds import methods, trainer
from relora_ds.engine.restart import relora_restart
from relora_ds.methods.hooks import Restarts
from relora_ds.methods.lora import LoRA
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config


class OnlineConstant(LoRA):
    name = "online_constant"
    EVERY = 3

    def restart_due(self, step: int) -> bool:
        since = step - self.switch_step
        return since > 0 and since % self.EVERY == 0

    def restart(self, engine, step: int) -> dict:
        self.merges = getattr(self, "merges", 0) + 1
        record = relora_restart(engine.ds, restart_index=self.merges, step=step, seed=self.cfg.train.seed, merge=True,
                                reset_optimizer=False, layout=engine.layout)
        return {"fraction_zeroed": record.fraction_zeroed}

    def callbacks(self) -> list:
        return [*super().callbacks(), Restarts(self)]

    def lr_multiplier(self, step: int) -> float:
        return min(1.0, step / self.cfg.schedule.warmup_steps)


def test_a_new_method_runs_through_the_trainer(tmp_path, monkeypatch):
    train_file, val_file = write_corpus(tmp_path)
    monkeypatch.setitem(methods.METHODS, "online_constant", OnlineConstant)  # as its own file would register it
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path), method="online_constant")
    summary = trainer.train(cfg, keep_engine=True)
    records = read_metrics(cfg.train.output_dir)
    events = [(r["event"], r["step"]) for r in records if r.get("event") in ("switch", "restart")]
    assert events == [("switch", 4), ("restart", 7), ("restart", 10), ("restart", 13)]
    assert all(r["fraction_zeroed"] == 0.0 for r in records if r.get("event") == "restart")  # no reset
    lrs = {r["step"]: r["lr"] for r in records if "event" not in r}
    assert lrs[1] == 3e-3 * 0 and all(lrs[s] == 3e-3 for s in range(3, 17))  # the method's LR, not the jagged one

    from transformers import AutoModelForCausalLM

    from relora_ds.tools.export import export

    hf = AutoModelForCausalLM.from_pretrained(export(cfg.train.output_dir, str(tmp_path / "export")))
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    model = summary["engine"].module.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    summary["engine"].destroy()

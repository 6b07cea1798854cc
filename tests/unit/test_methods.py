"""The training methods (relora_ds/methods/): what the trainer asks each of them, answered without a run."""

import functools
import math

import pytest
import torch

from relora_ds import methods
from relora_ds.config import load_config
from relora_ds.methods.relora import restart_action
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.schedule import lr_multiplier


def _cfg(mode, **overrides):
    base = {"method": mode, "train.total_steps": 1000, "schedule.warmup_steps": 100,
            "schedule.restart_warmup_steps": 50, "relora.reset_every": 300,
            "relora.warm_start_steps": 0 if mode == "full" else 200}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_the_registry_is_every_method_file():
    """Each module of relora_ds/methods/ but the interface and the hooks defines the method named as the file; the
    registry holds exactly those, and the config's `method` picks one by that name."""
    import os
    import pkgutil

    files = {m.name for m in pkgutil.iter_modules([os.path.dirname(methods.__file__)])} - set(methods.NOT_METHODS)
    assert set(methods.METHODS) == files
    for name, cls in methods.METHODS.items():
        assert cls.name == name and issubclass(cls, methods.Method)
    cfg = _cfg("relora")
    cfg.method = "sophia"  # bypasses validation on purpose
    with pytest.raises(ValueError, match=f"method must be one of {', '.join(methods.METHODS)}, got 'sophia'"):
        methods.from_config(cfg)


def test_lr_multiplier_per_method_continuing_at_the_switch():
    plain = functools.partial(lr_multiplier, total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    full, lora, relora = (methods.from_config(_cfg(m, **{"schedule.at_switch": "continue"})).lr_lambda
                          for m in ("full", "lora", "relora"))
    zeros = lambda fn: [t for t in range(1, 1000) if fn(t) == 0.0]  # noqa: E731
    assert zeros(full) == []
    assert zeros(lora) == [200]  # the switch starts a fresh optimizer: it re-warms
    assert zeros(relora) == [200, 500, 800]
    assert [full(t) for t in range(1000)] == [plain(t) for t in range(1000)]
    assert relora(250) == pytest.approx(plain(250))


def test_lr_multiplier_per_method_restarting_at_the_switch():
    """at_switch restart (the default): the full-rank schedule up to the switch at 200, then a new one over the 800
    low-rank steps: warm-up (100 steps, or switch_warmup_steps), the cosine from the peak, ReLoRA's restarts on it."""
    plain = functools.partial(lr_multiplier, total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    low_rank = functools.partial(lr_multiplier, total_steps=800, warmup_steps=100, min_lr_ratio=0.1)
    full, lora, relora = (methods.from_config(_cfg(m)).lr_lambda for m in ("full", "lora", "relora"))
    assert methods.from_config(_cfg("relora")).cfg.schedule.at_switch == "restart"
    zeros = lambda fn: [t for t in range(1, 1000) if fn(t) == 0.0]  # noqa: E731
    assert zeros(lora) == [200] and zeros(relora) == [200, 500, 800]
    assert [lora(t) for t in range(200)] == [relora(t) for t in range(200)] == [plain(t) for t in range(200)]
    assert [lora(t) for t in range(200, 1000)] == [low_rank(t - 200) for t in range(200, 1000)]
    assert [full(t) for t in range(1000)] == [plain(t) for t in range(1000)]
    # By hand: the warm-up from the switch, the peak again at 300 (continuing gives 0.88 there), the floor at the end.
    assert (lora(250), lora(300), relora(300)) == (0.5, 1.0, 1.0)
    assert relora(499) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 199 / 700)))
    ramp_target = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (300 + 50 - 100) / 700))  # env((t_r + Wr - W0)/(N - W0))
    assert relora(525) == pytest.approx(25 / 50 * ramp_target)
    assert lora(999) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 699 / 700)))
    # Its own warm-up at the switch; without a warm start (S = 0) it is the whole run's schedule.
    short = methods.from_config(_cfg("relora", **{"schedule.switch_warmup_steps": 20})).lr_lambda
    assert (short(210), short(220), short(199)) == (0.5, 1.0, plain(199))
    scratch = methods.from_config(_cfg("relora", **{"relora.warm_start_steps": 0})).lr_lambda
    scratch_continued = methods.from_config(_cfg("relora", **{"relora.warm_start_steps": 0,
                                                               "schedule.at_switch": "continue"})).lr_lambda
    assert [scratch(t) for t in range(1000)] == [scratch_continued(t) for t in range(1000)]


def test_low_rank_lr_scale_applies_once_wrapped():
    method = methods.from_config(_cfg("relora", **{"schedule.low_rank_lr_scale": 2}))
    assert method.lr_multiplier(150) == method.lr_lambda(150)
    assert method.lr_multiplier(250) == 2 * method.lr_lambda(250)
    full = methods.from_config(_cfg("full", **{"schedule.low_rank_lr_scale": 2}))
    assert full.lr_multiplier(250) == full.lr_lambda(250)  # nothing low-rank to scale


def test_impossible_schedule_rejected_when_the_method_is_made():
    cfg = _cfg("relora")
    cfg.relora.reset_every = 40  # bypasses load_config's validation on purpose
    with pytest.raises(ValueError, match=r"cycle_length \(C=40\) must be > restart_warmup_steps \(Wr=50\)"):
        methods.from_config(cfg)


def test_restart_action_merges_every_merge_every_and_resets_every_reset_every():
    merges = [t for t in range(1000) if restart_action(t, 200, 100, 300)[0]]
    assert merges == [300, 400, 500, 600, 700, 800, 900]  # online ReLoRA: merge_every 100 < reset_every 300
    assert [t for t in merges if restart_action(t, 200, 100, 300)[1]] == [500, 800]
    assert restart_action(200, 200, 100, 300) == (False, False)  # the switch places adapters; no merge there
    assert [t for t in range(1000) if restart_action(t, 0, 300, 300)[0]] == [300, 600, 900]


def test_relora_asks_for_restarts_only_after_the_switch():
    method = methods.from_config(_cfg("relora"))
    assert method.switch_step == 200
    assert method.switch_due(200) and not method.switch_due(199)
    assert [t for t in range(1000) if method.restart_due(t)] == [500, 800]  # nothing before or at the switch
    assert method.next_event(10) == 200 and method.next_event(510) == 800
    assert method.next_event(810) is None  # 1100 is past the end
    assert [type(c).__name__ for c in method.callbacks()] == ["WarmStartSwitch", "Restarts"]


def test_relora_state_is_its_merge_count():
    method = methods.from_config(_cfg("relora"))
    method.load_state_dict({"restart_index": 3})
    assert method.state_dict() == {"restart_index": 3}
    assert methods.from_config(_cfg("lora")).state_dict() == {}


def test_a_warm_start_checkpoint_moves_the_switch():
    """relora.warm_start_checkpoint with warm_start_steps 0: the switch (and the schedule's new start) is at the saved
    step, in the method's own copy of the config; another warm_start_steps must agree with it."""
    cfg = _cfg("relora", **{"relora.warm_start_steps": 0})
    method = methods.from_config(cfg)
    method.adopt_warm_start(300)
    assert method.switch_step == 300 and [t for t in range(1000) if method.restart_due(t)] == [600, 900]
    assert method.lr_lambda(300) == 0.0 and cfg.relora.warm_start_steps == 0
    with pytest.raises(ValueError, match="relora.warm_start_steps 200 disagrees with the warm-start checkpoint's step"):
        methods.from_config(_cfg("relora")).adopt_warm_start(300)


def test_lora_and_full_never_restart():
    lora, full = methods.from_config(_cfg("lora")), methods.from_config(_cfg("full"))
    assert not any(lora.restart_due(t) or full.restart_due(t) for t in range(1000))
    assert lora.next_event(10) == 200 and lora.next_event(300) is None
    assert full.switch_step is None and not full.switch_due(500) and full.callbacks() == []
    with pytest.raises(NotImplementedError, match="method full: wraps nothing"):
        full.wrap(torch.nn.Linear(2, 2))


def test_reference_step_is_the_switch_unless_set():
    assert methods.from_config(_cfg("relora")).reference_step() == 200
    assert methods.from_config(_cfg("relora", **{"checkpoint.at_switch": "false"})).reference_step() is None
    assert methods.from_config(_cfg("full")).reference_step() is None
    assert methods.from_config(_cfg("full", **{"checkpoint.reference_step": 200})).reference_step() == 200


@pytest.mark.parametrize("trainable_scaling", [False, True])
def test_exported_weight_is_the_merged_linear(trainable_scaling):
    cfg = _cfg("lora", **{"relora.rank": 4, "relora.alpha": 8, "relora.trainable_scaling": trainable_scaling})
    layer = ReLoRALinear.from_linear(torch.nn.Linear(12, 10, bias=False), 4, 8.0, 0.0, trainable_scaling, "torch",
                                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
        if trainable_scaling:
            layer.lora_scaling.fill_(0.7)
    adapters = {n: p.detach().float() for n, p in layer.named_parameters() if n.startswith("lora_")}
    exported = methods.from_config(cfg).exported_weight(layer.weight.detach().float().clone(), adapters)
    torch.testing.assert_close(exported, layer.merged_linear().weight, rtol=0, atol=1e-6)


def test_the_trainer_asks_the_method_and_reads_no_mode():
    """No method name in the trainer (no `.method` or `.mode` read of a config): what differs between methods is the
    method's answer."""
    import ast
    import inspect

    from relora_ds import trainer

    tree = ast.parse(inspect.getsource(trainer))
    reads = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "mode"]
    keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}  # counts["full"]: a count
    names = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in methods.METHODS and id(node) not in keys]
    assert reads == [] and names == []


def test_galore_is_one_file():
    """The method added last is named nowhere in the package but its own file: the registry, the config's choices and
    `compare`'s variants all come from relora_ds/methods/galore.py."""
    import os

    root = os.path.dirname(methods.__file__).rsplit(os.sep, 1)[0]
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".py") and path != os.path.join(root, "methods", "galore.py"):
                with open(path, encoding="utf-8") as f:
                    found += [f"{path}:{i}" for i, line in enumerate(f, 1) if "galore" in line.lower()]
    assert found == []
    assert "galore" in methods.METHODS


def test_a_checkpoint_from_before_method_state_resumes_its_merge_count():
    """Run states written before `method` held restart_index at the top level: the resume reads it from there."""
    from relora_ds.trainer import Trainer

    class Batches:
        def load_state_dict(self, state):
            self.state = state

    method, batches = methods.from_config(_cfg("relora")), Batches()
    trainer = Trainer(None, method, None, batches, None, [], tokens_per_step=1, train_tokens=None)
    trainer.load_state_dict({"step": 600, "tokens_seen": 6000, "data": {"kind": "indexed"}, "restart_index": 2,
                             "wrapped": True, "relora_start": 200})
    assert (trainer.state.step, method.restart_index, batches.state) == (600, 2, {"kind": "indexed"})
    trainer.load_state_dict({"step": 800, "tokens_seen": 8000, "data": {}, "method": {"restart_index": 3}}, resume=True)
    assert method.restart_index == 3

"""zero.layout_for: the layout class is chosen once from the optimizer DeepSpeed built, and what the restart
cannot edit is a one-line LayoutError naming the setting. Single process, DeepSpeed's classes without an engine;
the real engines of every stage are checked in tests/distributed/test_restart.py (check_contract)."""

import pytest
import torch

from relora_ds.engine import zero
from tests.helpers.fakes import FakeEngine


def adamw(param=None):
    return torch.optim.AdamW([param if param is not None else torch.nn.Parameter(torch.zeros(3))])


def wrapped(cls, **attributes):
    """An instance of a DeepSpeed optimizer wrapper around a torch AdamW, without running its __init__."""
    optimizer = cls.__new__(cls)
    optimizer.optimizer = adamw()
    for name, value in attributes.items():
        setattr(optimizer, name, value)
    return optimizer


def unfused():
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return wrapped(FP16_UnfusedOptimizer)


def zero_1_2():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return wrapped(DeepSpeedZeroOptimizer, bit16_groups=[[]])


@pytest.mark.parametrize("make_optimizer, stage, expected", [
    (adamw, 0, zero.PlainLayout),
    (unfused, 0, zero.UnfusedLayout),
    (zero_1_2, 1, zero.HpLayout),
    (zero_1_2, 2, zero.HpLayout),
    (adamw, 3, zero.Zero3Layout),  # ZeRO-3 by its stage, whatever the optimizer object
])
def test_each_engine_gets_its_layout(make_optimizer, stage, expected):
    engine = FakeEngine(make_optimizer(), stage=stage)
    layout = zero.layout_for(engine)
    assert type(layout) is expected and layout.engine is engine
    assert layout.replicated_weight == (stage != 3)
    assert layout.replicated_state == (stage == 0)
    assert not layout.moments_checked


def test_unsupported_optimizer_is_a_one_line_error():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    with pytest.raises(zero.LayoutError) as e:
        zero.layout_for(FakeEngine(wrapped(FP16_Optimizer), stage=0))
    message = str(e.value)
    assert message.startswith("optimizer.type adamw: ") and "FP16_Optimizer" in message and "\n" not in message


def test_no_optimizer_is_a_one_line_error():
    with pytest.raises(zero.LayoutError, match=r"^optimizer: the DeepSpeed engine has no optimizer"):
        zero.layout_for(FakeEngine(None))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_is_refused_before_the_layout_is_chosen(stage):
    with pytest.raises(zero.LayoutError) as e:
        zero.layout_for(FakeEngine(adamw(), stage=stage, fp16=True))
    assert str(e.value).startswith("fp16.enabled: ") and "\n" not in str(e.value)


def test_plain_layout_reads_the_parameter_and_its_moments_in_place():
    param = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    optimizer = adamw(param)
    layout = zero.layout_for(FakeEngine(optimizer), {"w": param})
    assert not layout.moments_checked  # no moments before the first step
    assert not layout.has_state([param], ("exp_avg",))
    with pytest.raises(KeyError):
        layout.fragment(param, "exp_avg")
    param.grad = torch.ones(2, 3)
    optimizer.step()
    assert layout.has_state([param], ("exp_avg", "exp_avg_sq"))
    frag = layout.fragment(param, "exp_avg")
    frag.tensor.zero_()
    layout.commit(param, frag, "exp_avg")
    assert not optimizer.state[param]["exp_avg"].any()  # the fragment is a view of the state
    assert (frag.start, frag.numel, frag.replicated) == (0, 6, True)
    assert zero.layout_for(FakeEngine(optimizer), {"w": param}).moments_checked
    layout.check_moments({"w": param})  # the ZeRO-0 recheck after the first step
    assert layout.moments_checked


def test_restart_refuses_a_layout_made_for_another_engine():
    from relora_ds.engine.restart import relora_restart

    layout = zero.layout_for(FakeEngine(adamw()))
    with pytest.raises(ValueError, match="made for another engine"):
        relora_restart(FakeEngine(adamw()), restart_index=1, step=1, seed=0, layout=layout)

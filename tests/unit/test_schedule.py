import math

import pytest

from relora_ds.schedule import (
    check_schedule,
    envelope,
    lr_multiplier,
)

# docs/algorithm.md's worked example: N = 15000, W0 = 500, Wr = 100, C = 5000, m = 0.1.
WORKED = dict(total_steps=15000, warmup_steps=500, restart_warmup_steps=100, cycle_length=5000, min_lr_ratio=0.1)
WORKED_VALUES = {0: 0.0, 250: 0.5, 500: 1.0, 4999: 0.802615, 5000: 0.0, 5050: 0.397203, 5100: 0.794406,
                 10000: 0.0, 10100: 0.330652, 14999: 0.100000}


@pytest.mark.parametrize("step,expected", sorted(WORKED_VALUES.items()))
def test_worked_example(step, expected):
    assert lr_multiplier(step, **WORKED) == pytest.approx(expected, abs=1e-6)


def _authors_formula(t, N, W0, Wr, C, m):
    """docs/algorithm.md's S = 0 formula written out independently (j = t mod C, k = t div C)."""
    env = lambda p: m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))  # noqa: E731
    if t < W0:
        return t / W0
    j, k = t % C, t // C
    if t >= C and j < Wr:
        return j / Wr * env((k * C + Wr - W0) / (N - W0))
    return env((t - W0) / (N - W0))


def test_no_offset_equals_authors_formula_at_every_step():
    N, W0, Wr, C, m = 1000, 50, 20, 200, 0.05
    for t in range(N):
        got = lr_multiplier(t, total_steps=N, warmup_steps=W0, restart_warmup_steps=Wr, cycle_length=C,
                            min_lr_ratio=m)
        assert got == pytest.approx(_authors_formula(t, N, W0, Wr, C, m), abs=1e-12), t


@pytest.mark.parametrize("kwargs,message", [
    (dict(cycle_length=50, restart_warmup_steps=50), r"cycle_length \(C=50\) must be > restart_warmup_steps \(Wr=50\)"),
    (dict(cycle_length=400, warmup_steps=500), r"warmup_steps \(W0=500\) must be <= cycle_length \(C=400\)"),
    (dict(total_steps=500, warmup_steps=500), r"total_steps \(N=500\) must be > warmup_steps \(W0=500\)"),
    (dict(restart_offset=200, warmup_steps=500, cycle_length=1000),
     r"restart_offset \(S=200\) must be 0 or >= warmup_steps \(W0=500\)"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\], got 1.5"),
    (dict(kind="linear"), r"schedule kind must be one of jagged_cosine, cosine, constant, got 'linear'"),
    (dict(cycle_length=0, restart_warmup_steps=0), r"cycle_length must be >= 1, got 0"),
])
def test_impossible_settings_raise(kwargs, message):
    settings = dict(total_steps=10000, warmup_steps=100, restart_warmup_steps=50, cycle_length=1000)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_schedule(**settings)
    with pytest.raises(ValueError, match=message):
        lr_multiplier(600, **settings)


def test_cycle_constraints_only_apply_to_the_jagged_kind():
    check_schedule(total_steps=1000, warmup_steps=100, restart_warmup_steps=50, cycle_length=50, kind="cosine")
    with pytest.raises(ValueError, match="must be >"):
        check_schedule(total_steps=1000, warmup_steps=100, restart_warmup_steps=50, cycle_length=50)


def test_negative_step_raises():
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        lr_multiplier(-1, **WORKED)


def test_zero_at_restarts_and_back_on_the_envelope_after_the_rewarmup():
    N, W0, Wr, C, S, m = 1000, 100, 50, 300, 200, 0.1
    kw = dict(total_steps=N, warmup_steps=W0, restart_warmup_steps=Wr, cycle_length=C, restart_offset=S,
              min_lr_ratio=m)
    plain = dict(total_steps=N, warmup_steps=W0, min_lr_ratio=m)
    points = [200, 500, 800]  # S + k·C < N
    assert [t for t in range(1, N) if lr_multiplier(t, **kw) == 0.0] == points
    for t_r in points:
        target = envelope((t_r + Wr - W0) / (N - W0), m)
        assert lr_multiplier(t_r, **kw) == 0.0
        assert lr_multiplier(t_r + Wr // 2, **kw) == pytest.approx(0.5 * target, abs=1e-12)
        assert lr_multiplier(t_r + Wr, **kw) == pytest.approx(target, abs=1e-12)
        assert lr_multiplier(t_r + Wr, **kw) == pytest.approx(lr_multiplier(t_r + Wr, **plain), abs=1e-12)
        ramp = [lr_multiplier(t, **kw) for t in range(t_r, t_r + Wr)]
        assert ramp == sorted(ramp) and ramp[-1] < target
    # away from the ramps the jagged schedule is the plain warm-up + cosine
    ramps = {t for t_r in points for t in range(t_r, t_r + Wr)}
    for t in range(N):
        if t not in ramps:
            assert lr_multiplier(t, **kw) == pytest.approx(lr_multiplier(t, **plain), abs=1e-12), t
    assert lr_multiplier(N - 1, **kw) == pytest.approx(m, abs=1e-4)
    assert lr_multiplier(N + 100, **kw) == pytest.approx(m)  # past the end: the floor


def test_kinds_cosine_and_constant():
    kw = dict(total_steps=1000, warmup_steps=100, restart_warmup_steps=50, cycle_length=300, restart_offset=200)
    jagged_free = dict(total_steps=1000, warmup_steps=100)
    for t in (0, 50, 200, 210, 500, 999):
        assert lr_multiplier(t, kind="cosine", **kw) == lr_multiplier(t, **jagged_free)
    assert lr_multiplier(50, kind="constant", **kw) == 0.5
    assert [lr_multiplier(t, kind="constant", **kw) for t in (100, 200, 500, 999)] == [1.0] * 4
    assert lr_multiplier(0, total_steps=10, warmup_steps=0, kind="constant") == 1.0
    assert lr_multiplier(0, total_steps=10, warmup_steps=0) == 1.0

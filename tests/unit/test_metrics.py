"""Metrics sinks (JSONL, progress/console lines, wandb and TensorBoard through fakes) and loss.png."""

import json
import os
import sys
import types

import pytest
import torch

from relora_ds.metrics import Metrics, read_records
from relora_ds.plots import loss_figure, plot_loss, read_curves, smooth
from tests.helpers.fakes import Redirected, Terminal


def records(run_dir):
    return read_records(os.path.join(run_dir, "metrics.jsonl"))


def fake_run(run_dir, total=100, every=10, restarts=(40, 70), switch=20, **kwargs):
    """A short synthetic run in the trainer's order: eval at 0; at step s (before the step that makes it
    s + 1) the switch or a restart; then the step's record and every 50 steps a checkpoint; a final eval."""
    with Metrics(str(run_dir), total_steps=total, rank=0, every=every, progress=False, **kwargs) as m:
        m.log_event("eval", 0, loss=5.5, perplexity=244.7)
        for s in range(total):
            if s == switch:
                m.log_event("switch", s)
            if s in restarts:
                m.log_event("restart", s, restart=restarts.index(s) + 1, fraction_zeroed=0.99,
                            merged_norm=1.25, seconds=0.3)
            step = s + 1
            m.log_step(step, loss=6.0 - 0.03 * step, lr=1e-3 * (step % 30) / 30, tokens_seen=step * 512,
                       tokens_per_s=1000.0, grad_norm=0.5, next_restart=None)
            if step % 50 == 0:
                m.log_event("checkpoint", step, path=f"ckpt/step{step}")
        m.log_event("eval", total, loss=2.9, perplexity=18.2)


def test_jsonl_records_steps_on_cadence_and_events(tmp_path, capsys):
    fake_run(tmp_path, total=25, every=10, restarts=(15,), switch=5)
    recs = records(tmp_path)
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == [10, 20, 25]  # every 10, plus the last step
    first = steps[0]
    assert set(first) == {"step", "time", "loss", "lr", "tokens_seen", "tokens_per_s", "grad_norm", "next_restart"}
    assert first["loss"] == pytest.approx(5.7) and first["tokens_seen"] == 5120 and first["next_restart"] is None
    events = [(r["event"], r["step"]) for r in recs if "event" in r]
    assert events == [("eval", 0), ("switch", 5), ("restart", 15), ("eval", 25)]
    restart = next(r for r in recs if r.get("event") == "restart")
    assert restart["fraction_zeroed"] == 0.99 and restart["merged_norm"] == 1.25 and restart["restart"] == 1
    out = capsys.readouterr().out
    assert "[step 15] restart restart=1 fraction_zeroed=0.99 merged_norm=1.25 seconds=0.3" in out
    assert "step 20/25 loss 5.4" in out  # progress=False: one plain line per record


def test_values_from_tensors_and_numpy_become_plain_numbers(tmp_path):
    import numpy as np

    with Metrics(str(tmp_path), total_steps=10, rank=0, every=1, progress=False) as m:
        m.log_step(1, loss=torch.tensor(2.5), tokens_seen=np.int64(7), lr=np.float32(0.5))
    (rec,) = records(tmp_path)
    assert rec["loss"] == 2.5 and rec["tokens_seen"] == 7 and rec["lr"] == 0.5
    assert isinstance(rec["tokens_seen"], int)


def test_nonzero_rank_is_a_no_op(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with Metrics(str(run_dir), total_steps=10, rank=1, every=1, wandb=True, tensorboard=True) as m:
        m.log_step(1, loss=1.0)
        m.log_event("restart", 1, fraction_zeroed=0.5)
        assert m.truncate_after(0) == 0
    assert not run_dir.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def log_two_records(run_dir, **kwargs):
    with Metrics(str(run_dir), total_steps=20, rank=0, every=10, **kwargs) as m:
        m.log_step(10, loss=3.25, lr=1e-3, grad_norm=0.8125, tokens_seen=640, tokens_per_s=1234.0, mfu=0.4125,
                   next_restart=15)
        m.log_event("restart", 15, restart=1, fraction_zeroed=0.99)
        m.log_step(20, loss=3.0, lr=5e-4, grad_norm=1.5, tokens_seen=1280, tokens_per_s=1500.0, mfu=0.5,
                   next_restart=None)


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    out, err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log_two_records(tmp_path, progress=True)
    assert "[step 15] restart restart=1 fraction_zeroed=0.99" in out.getvalue()
    assert "step 10/20" not in out.getvalue()  # the bar shows the steps; no plain lines beside it
    bar = err.getvalue()
    assert "\r" in bar and "10/20" in bar and "20/20" in bar
    assert "loss=3.2500" in bar and "next restart=15" in bar and "tok/s=1234" in bar
    assert "gnorm=0.812" in bar and "mfu=41.2%" in bar


def test_redirected_output_gets_one_plain_line_per_record(tmp_path, monkeypatch):
    out, err = Redirected(), Redirected()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log_two_records(tmp_path, progress=True)
    assert err.getvalue() == ""  # no bar, no carriage returns in the log file
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0] == ("step 10/20 loss 3.2500 lr 1.000e-03 grad_norm 0.8125 tokens_seen 640 tokens_per_s 1234 "
                        "mfu 41.2% next_restart 15")
    assert lines[1] == "[step 15] restart restart=1 fraction_zeroed=0.99"
    assert lines[2].startswith("step 20/20 loss 3.0000 lr 5.000e-04 grad_norm 1.5 tokens_seen 1280 "
                               "tokens_per_s 1500 mfu 50.0% eta 0:00:00")
    # the same records in metrics.jsonl: mfu as a fraction
    steps = [r for r in records(tmp_path) if "event" not in r]
    assert [(r["grad_norm"], r["mfu"]) for r in steps] == [(0.8125, 0.4125), (1.5, 0.5)]


def test_terminal_bar_with_stdout_redirected_writes_the_lines_to_stdout(tmp_path, monkeypatch):
    out, err = Redirected(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log_two_records(tmp_path, progress=True)
    assert "20/20" in err.getvalue()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["10/20", "15]", "20/20"]


def test_progress_false_prints_plain_lines_even_on_a_terminal(tmp_path, monkeypatch):
    out, err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log_two_records(tmp_path, progress=False)
    assert err.getvalue() == ""
    assert out.getvalue().startswith("step 10/20 loss 3.2500 ")


def test_plain_line_eta_and_left_out_values(tmp_path):
    with Metrics(str(tmp_path), total_steps=1000, rank=0, every=10, progress=False) as m:
        assert m.step_line(10, {"loss": 2.0, "next_restart": None}, now=100.0) == "step 10/1000 loss 2.0000"
        # 90 steps in 45 s: 0.5 s per step, 900 steps to go
        assert m.step_line(100, {"loss": 1.5}, now=145.0) == "step 100/1000 loss 1.5000 eta 0:07:30"


def test_values_left_out_are_missing_from_every_sink(tmp_path, monkeypatch, capsys):
    """A CPU run (no peak: no mfu) on a stage without a norm (no grad_norm): keys absent, not null."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with Metrics(str(tmp_path), total_steps=10, rank=0, every=10, progress=False, wandb=True) as m:
        m.log_step(10, loss=2.0, lr=1e-3, tokens_per_s=100.0, next_restart=None)
    (rec,) = records(tmp_path)
    assert "mfu" not in rec and "grad_norm" not in rec
    assert fake.logged == [(10, {"train/loss": 2.0, "train/lr": 1e-3, "train/tokens_per_s": 100.0})]
    line = capsys.readouterr().out
    assert "mfu" not in line and "grad_norm" not in line


def test_unknown_event_and_bad_cadence_are_refused(tmp_path):
    with Metrics(str(tmp_path), total_steps=10, rank=0, progress=False) as m:
        with pytest.raises(ValueError, match="metrics event must be one of"):
            m.log_event("restrat", 3)
    with pytest.raises(ValueError, match="log.every must be >= 1"):
        Metrics(str(tmp_path), total_steps=10, rank=0, every=0)


def test_truncate_after_drops_records_a_resumed_run_rewrites(tmp_path):
    fake_run(tmp_path, total=100, every=10, restarts=(40, 50, 70))
    m = Metrics(str(tmp_path), total_steps=100, rank=0, every=10, progress=False)
    dropped = m.truncate_after(50)
    recs = records(tmp_path)
    assert max(r["step"] for r in recs) == 50
    # The restart at step 50 came after the step-50 checkpoint: the resumed run redoes it.
    at_50 = [r.get("event") for r in recs if r["step"] == 50]
    assert at_50 == [None, "checkpoint"]
    assert [r["step"] for r in recs if r.get("event") == "restart"] == [40]
    assert dropped == 5 + 1 + 1 + 1 + 1  # steps 60..100, restarts 50 and 70, checkpoint 100, final eval
    m.log_event("restart", 50, restart=2, fraction_zeroed=0.99)
    m.log_step(60, loss=1.0)
    m.close()
    recs = records(tmp_path)
    assert [(r.get("event"), r["step"]) for r in recs[-3:]] == [("checkpoint", 50), ("restart", 50), (None, 60)]


def test_truncate_after_without_checkpoint_record_keeps_that_step(tmp_path):
    with Metrics(str(tmp_path), total_steps=30, rank=0, every=10, progress=False) as m:
        for step in (10, 20, 30):
            m.log_step(step, loss=1.0)
        m.log_event("eval", 20, loss=1.0, perplexity=2.7)
    with Metrics(str(tmp_path), total_steps=30, rank=0, every=10, progress=False) as m:
        assert m.truncate_after(20) == 1
    assert [(r.get("event"), r["step"]) for r in records(tmp_path)] == [(None, 10), (None, 20), ("eval", 20)]


def test_corrupt_metrics_file_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_records(str(path))


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init arguments and logged dicts."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished = True

        return Run()


@pytest.mark.parametrize("api_key, mode_env, expected", [(None, None, "offline"), ("k", None, "online"),
                                                          ("k", "offline", "offline"),
                                                          ("k", "disabled", "disabled")])
def test_wandb_gets_the_same_metrics_and_events(tmp_path, monkeypatch, api_key, mode_env, expected):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name, value in (("WANDB_API_KEY", api_key), ("WANDB_MODE", mode_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with Metrics(str(tmp_path / "r1"), total_steps=20, rank=0, every=10, progress=False, wandb=True,
                 wandb_project="proj", run_name="exp", tags=("a", "b"), config={"relora": {"rank": 8}}) as m:
        m.log_step(10, loss=3.0, lr=1e-3, next_restart=None)
        m.log_event("restart", 12, restart=1, fraction_zeroed=0.99)
        m.log_event("checkpoint", 20, path="x")  # no numbers: nothing for the dashboard
    kw = fake.init_kwargs
    assert kw["mode"] == expected and kw["project"] == "proj" and kw["name"] == "exp"
    assert kw["tags"] == ["a", "b"] and kw["config"] == {"relora": {"rank": 8}}
    run_id = kw["id"]
    assert len(run_id) == 8 and run_id.isalnum()
    assert fake.logged == [(10, {"train/loss": 3.0, "train/lr": 1e-3}),
                           (12, {"restart/restart": 1, "restart/fraction_zeroed": 0.99})]
    assert fake.finished
    assert (tmp_path / "r1" / "wandb_run_id").read_text().strip() == run_id  # a resume reuses it


def test_missing_optional_packages_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"log.wandb=true needs the wandb package"):
        Metrics(str(tmp_path), total_steps=1, rank=0, wandb=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"log.tensorboard=true needs the tensorboard package"):
        Metrics(str(tmp_path), total_steps=1, rank=0, tensorboard=True)


def test_tensorboard_scalars(tmp_path, monkeypatch):
    scalars, closed = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            assert log_dir == os.path.join(str(tmp_path), "tensorboard")

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    with Metrics(str(tmp_path), total_steps=10, rank=0, every=5, progress=False, tensorboard=True) as m:
        m.log_step(5, loss=2.0, tokens_per_s=10.0)
        m.log_event("eval", 5, loss=2.5, perplexity=12.2)
    assert scalars == [("train/loss", 2.0, 5), ("train/tokens_per_s", 10.0, 5), ("eval/loss", 2.5, 5),
                       ("eval/perplexity", 12.2, 5)]
    assert closed == [True]


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
def test_wandb_offline_for_real(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    with Metrics(str(run_dir), total_steps=10, rank=0, every=5, progress=False, wandb=True, tags=("t",)) as m:
        m.log_step(5, loss=2.0)
        m.log_event("restart", 6, restart=1, fraction_zeroed=0.99)
    offline_runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert len(offline_runs) == 1 and offline_runs[0].endswith((run_dir / "wandb_run_id").read_text().strip())


# ---- plots ---------------------------------------------------------------------------------------


def test_read_curves_finds_losses_evals_switch_and_restarts(tmp_path):
    fake_run(tmp_path, total=100, every=10, restarts=(40, 70), switch=20)
    curves = read_curves(str(tmp_path / "metrics.jsonl"))
    assert curves.steps == list(range(10, 101, 10))
    assert curves.losses[0] == pytest.approx(5.7)
    assert curves.eval_steps == [0, 100] and curves.eval_losses == [5.5, 2.9]
    assert curves.switch_steps == [20] and curves.restart_steps == [40, 70]
    assert curves.lr_steps == curves.steps


def test_plot_loss_writes_a_png_with_the_restarts_drawn(tmp_path):
    fake_run(tmp_path, total=100, every=2, restarts=(40, 70), switch=20)
    out = tmp_path / "plots" / "loss.png"
    assert plot_loss(str(tmp_path / "metrics.jsonl"), str(out)) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(out.parent) == ["loss.png"]  # no temporary file left behind

    fig = loss_figure(read_curves(str(tmp_path / "metrics.jsonl")), title="t")
    ax = fig.axes[0]
    vertical = sorted(line.get_xdata()[0] for line in ax.lines
                      if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1])
    assert vertical == [20, 40, 70]
    labels = {t.get_text().strip() for t in ax.texts}
    assert {"switch", "R1", "R2"} <= labels
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["train loss", "train loss (mean of 2)", "eval loss", "warm start → ReLoRA", "restart", "lr"]
    assert fig.axes[1].get_ylabel() == "learning rate"


def test_plot_loss_before_any_training_step_and_missing_file(tmp_path):
    with Metrics(str(tmp_path), total_steps=10, rank=0, progress=False) as m:
        m.log_event("eval", 0, loss=5.0, perplexity=148.4)
    out = plot_loss(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    assert os.path.getsize(out) > 0
    with pytest.raises(ValueError, match="nope.jsonl: metrics file not found"):
        plot_loss(str(tmp_path / "nope.jsonl"), str(tmp_path / "x.png"))


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_jsonl_lines_are_standalone_json(tmp_path):
    fake_run(tmp_path, total=10, every=5, restarts=(), switch=3)
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines) and len(lines) == 5

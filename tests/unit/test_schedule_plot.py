"""`relora-ds schedule CONFIG --out lr.png`: the LR the trainer would set at every step, drawn under both
schedule.at_switch modes; the figure is the one in docs/algorithm.md."""

import os

from relora_ds import cli
from relora_ds.config import load_config

DEMO = os.path.join(os.path.dirname(cli.__file__), "configs", "demo.yaml")


def test_series_follow_each_mode_and_the_config_comes_first():
    cfg = load_config(DEMO)  # lr 2e-3, warm-up 50, switch at 400, restarts at 700, 1000, 1300, 1600 steps
    series = cli.schedule_series(cfg)
    assert list(series) == ["at_switch restart", "at_switch continue"]
    restart, continued = series.values()
    assert len(restart) == len(continued) == 1600
    assert restart[:400] == continued[:400]  # the same full-rank warm start
    assert restart[400] == continued[400] == 0.0  # a fresh optimizer at the switch: the LR starts from 0
    assert restart[450] == 2e-3 and continued[450] < 0.9 * 2e-3  # the peak again, or the falling cosine
    assert [t for t in range(1, 1600) if restart[t] == 0.0] == [400, 700, 1000, 1300]
    cfg.schedule.at_switch = "continue"
    assert list(cli.schedule_series(cfg)) == ["at_switch continue", "at_switch restart"]
    full = load_config(DEMO, ["method=full", "relora.warm_start_steps=0"])
    assert list(cli.schedule_series(full)) == ["full"]


def test_cli_writes_the_png_and_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli.main(["schedule", DEMO, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["schedule", DEMO, "--out", str(out), "--set", "schedule.at_switch=maybe"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: schedule.at_switch: must be one of restart, continue, got 'maybe'"]

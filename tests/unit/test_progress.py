"""relora_ds/progress.py: a bar on a terminal, plain lines at most every `interval` seconds elsewhere, nothing
when disabled; the plain line's fields."""

import sys

from relora_ds.progress import Progress, clock, draws_bar, plain_line, si
from tests.helpers.fakes import Redirected, Terminal


def test_a_terminal_gets_a_bar(monkeypatch):
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert draws_bar() and not draws_bar(enabled=False)
    with Progress(4, "svd run", "weight") as progress:
        for _ in range(4):
            progress.update(1)
    bar = err.getvalue()
    assert "\r" in bar and "svd run" in bar and "4/4" in bar and "weight/s" in bar


def test_a_file_gets_plain_lines_at_most_every_interval(monkeypatch):
    err = Redirected()
    monkeypatch.setattr(sys, "stderr", err)
    assert not draws_bar()
    with Progress(4, "svd run", "weight", interval=0.0) as progress:
        for _ in range(4):
            progress.update(1)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and len(lines) == 4
    assert lines[0].startswith("svd run: 1weight, ") and ", 25.0% of 4weight, eta " in lines[0]
    assert ", 100.0% of 4weight, eta 0:00:00, elapsed " in lines[-1]

    err.seek(0)
    err.truncate()
    with Progress(4, "slow", "weight") as progress:  # 30 s between lines: none in a fast job, none at the end
        progress.update(4)
    progress.finish("done")
    assert err.getvalue() == ""


def test_disabled_progress_shows_nothing(monkeypatch):
    for stream in (Terminal(), Redirected()):
        monkeypatch.setattr(sys, "stderr", stream)
        with Progress(2, "quiet", enabled=False, interval=0.0) as progress:
            progress.update(2)
        assert stream.getvalue() == ""


def test_plain_line_fields():
    assert plain_line("job", 0, None, "B", 5.0) == "job: 0B, 0B/s, elapsed 0:00:05"
    assert plain_line("job", 250, 1000, "tok", 10.0, postfix="250 tokens, 25 tokens/s") == \
        "job: 250 tokens, 25 tokens/s, 25.0% of 1.0ktok, eta 0:00:30, elapsed 0:00:10"
    assert [si(v) for v in (0.25, 12.5, 950, 1234, 5.6e6, 7e9)] == ["0.25", "12.5", "950", "1.2k", "5.6M", "7.0G"]
    assert clock(3725.4) == "1:02:05"


def test_finish_fills_the_bar_to_its_total(monkeypatch):
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    progress = Progress(10, "estimate", "B")
    progress.update(7)
    progress.finish("7 tokens")
    assert "10/10" in err.getvalue() and "7 tokens" in err.getvalue()

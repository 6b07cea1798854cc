"""Progress of a long job on stderr: a tqdm bar when stderr is a terminal, else one plain line every 30 s.

    with Progress(total=len(names), description="svd run", unit="weight") as progress:
        for name in names:
            ...
            progress.update(1)

Redirected to a file (SLURM, nohup), a bar's carriage-return redraws would garble the log, so a file gets a plain
line instead, at most one every `interval` seconds (`plain_line`: count and rate, or the caller's postfix; the share
of the total, ETA and elapsed time). `enabled=False` shows nothing. The training loop's Metrics takes the same
decision (`draws_bar`) and the same bar (`make_bar`), but prints its own line per logged step instead.
"""

import sys
import time

PLAIN_INTERVAL = 30.0  # seconds between two plain lines
BAR_INTERVAL = 0.5  # seconds between two redraws of a bar (tqdm's mininterval)


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a file, a pipe, a closed stream or an object without isatty)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def draws_bar(enabled: bool = True) -> bool:
    """Whether progress is shown as a bar: when enabled and stderr is a terminal."""
    return enabled and is_terminal(sys.stderr)


def make_bar(total, description: str, unit: str, **options):
    """A tqdm bar on stderr, redrawn at most every 0.5 s and as wide as the terminal; `options` go to tqdm."""
    from tqdm import tqdm

    options = {"mininterval": BAR_INTERVAL, "dynamic_ncols": True, **options}
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, **options)


def si(value: float) -> str:
    """A count with an SI prefix: 950, 12.5, 1.2k, 3.4M, 5.0G."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{prefix}"
    return f"{value:.0f}" if float(value).is_integer() or value >= 100 else f"{value:.3g}"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plain_line(description: str, n: float, total: float | None, unit: str, elapsed: float,
               postfix: str | None = None) -> str:
    """One line of progress without a bar: "svd run: 12weight, 0.4weight/s, 10.7% of 112weight, eta 0:04:30,
    elapsed 0:00:32". A `postfix` stands in place of the count and the rate; without a total, no share and no ETA."""
    rate = n / max(elapsed, 1e-9)
    parts = [f"{description}: {postfix or f'{si(n)}{unit}, {si(rate)}{unit}/s'}"]
    if total:
        fraction = min(n / total, 1.0)
        parts.append(f"{100 * fraction:.1f}% of {si(total)}{unit}")
        if fraction > 0:
            parts.append(f"eta {clock(elapsed * (1 - fraction) / fraction)}")
    parts.append(f"elapsed {clock(elapsed)}")
    return ", ".join(parts)


class Progress:
    """The progress of one job (see the module docstring): `update(n)` as work is done, `close()` or `finish()` at
    the end (a `with` block closes it). `n` counts the work done so far; `line()` is its plain line."""

    def __init__(self, total=None, description: str = "", unit: str = "it", *, enabled: bool = True,
                 interval: float = PLAIN_INTERVAL, unit_scale: bool = False, leave: bool = True):
        self.total, self.description, self.unit, self.interval = total, description, unit, interval
        self.n, self.postfix = 0, None
        self.started = self._shown = time.perf_counter()
        self._bar = make_bar(total, description, unit, unit_scale=unit_scale, leave=leave) if draws_bar(enabled) \
            else None
        self._lines = enabled and self._bar is None

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        """`n` more units done; `postfix` (e.g. "1.2M tokens, 30.0k tokens/s") replaces the previous one."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif self._lines and time.perf_counter() - self._shown >= self.interval:
            self._shown = time.perf_counter()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        """The plain line of the progress so far."""
        return plain_line(self.description, self.n, self.total, self.unit, time.perf_counter() - self.started,
                          self.postfix)

    def finish(self, postfix: str | None = None) -> None:
        """Close, the bar filled to its total (a total that was an estimate the count fell short of) and showing
        `postfix`; no plain line."""
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            if self.total:
                self._bar.update(max(self.total - self._bar.n, 0))
        self.close()

    def close(self) -> None:
        """Close the bar (a plain line is never printed at the end). Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._lines = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


__all__ = ["Progress", "clock", "draws_bar", "is_terminal", "make_bar", "plain_line", "si"]

"""Progress a person can read: a bar on a terminal, a line every half minute in a log file.

    bar = progress.Progress(2000, desc="train", unit="steps", initial=500)
    for step in ...:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
    bar.close()

On a terminal this is a tqdm bar. When stderr is not a terminal (a log file, a batch job, a
pipe) a bar would rewrite itself thousands of times on one line, so instead one line is printed
every `interval_s` seconds and at the end:

    train: 750/2000 steps (37.5%), 2.31 steps/s, 9m01s left, loss 0.0321

Only process 0 of a multi-process run prints.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import jax

# Seconds between progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts work toward a total and shows it (see the module docstring).

    Args:
      total: units of work in all (steps, images, reverse steps, ...).
      desc: what is being done, printed first.
      unit: name of the unit, plural ("steps").
      initial: units already done before this run (a resumed run).
      enabled: False shows nothing (also on processes other than 0).
      interval_s: seconds between lines when not on a terminal.
      stream: where to print; default stderr.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "steps",
        initial: int = 0,
        enabled: bool = True,
        interval_s: float = LINE_INTERVAL_S,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._start_n = int(initial)
        self._stream = sys.stderr if stream is None else stream
        self._enabled = enabled and jax.process_index() == 0
        self._interval = interval_s
        self._postfix: dict[str, Any] = {}
        self._last_line, self._printed_n = time.monotonic(), None
        self._first: tuple[int, float] | None = None  # (count, time) after the first update
        self._bar = None
        if self._enabled and _is_terminal(self._stream):
            import tqdm

            self._bar = tqdm.tqdm(
                total=self.total, initial=self.n, unit=unit.rstrip("s") or unit, desc=desc,
                dynamic_ncols=True, smoothing=0.1, file=self._stream,
            )  # fmt: skip

    def update(self, n: int = 1) -> None:
        """Marks `n` more units done."""
        if self._first is None:  # rates from the first unit on: compiling is not progress.
            self._first = (self.n + n, time.monotonic())
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and time.monotonic() - self._last_line >= self._interval:
            self._print_line()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (e.g. loss=0.03), until replaced."""
        self._postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def line(self) -> str:
        """The progress line as it would be printed now."""
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.1f}%)"
        done, elapsed = 0, 0.0
        if self._first is not None:
            done, elapsed = self.n - self._first[0], time.monotonic() - self._first[1]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self._stream, flush=True)
        self._last_line, self._printed_n = time.monotonic(), self.n

    def close(self) -> None:
        """Prints the final state (off a terminal) and releases the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._enabled and self.n not in (self._start_n, self._printed_n):
            self._print_line()
        self._enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

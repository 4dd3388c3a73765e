"""One progress bar for every long loop of coopkit (training, feature caching, batch prediction).

In a terminal it is tqdm's bar, redrawn in place as before. When its stream is not a terminal
(a log file, a pipe, a CI job) a redrawn bar would write hundreds of updates per run, so it
writes a plain line instead, at most one every :data:`LOG_INTERVAL_S` seconds, and one when it
closes: ``training: 12/50 epoch (24%), 31.0 s, 0.39 epoch/s``. tqdm is optional (the ``cli``
and ``train`` extras): without it a terminal gets the plain lines too.

>>> for x in progress_bar(range(3), desc="work", unit="step"):  # doctest: +SKIP
...     pass
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Iterable, Iterator, Optional

#: Seconds between two plain progress lines when the output is not a terminal.
LOG_INTERVAL_S = 10.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's small interface (``update``, ``set_postfix``, ``close``, iteration, ``with``) writing
    at most one plain line every ``interval`` seconds, and a last one on :meth:`close` (nothing
    when not ``enabled``)."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: Optional[IO[str]] = None,
                 interval: float = LOG_INTERVAL_S, enabled: bool = True) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = int(initial)
        self.file = file
        self.interval = float(interval)
        self.enabled = bool(enabled)
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self._written_n: Optional[int] = None
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress without an iterable: call update() instead"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; writes a line when ``interval`` seconds passed since the last."""
        self.n += int(n)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: Optional[dict[str, Any]] = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown after the count in the next line (``loss=0.31``), as tqdm's ``set_postfix``."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Write the last line (when there is progress it has not shown yet)."""
        if self.closed:
            return
        self.closed = True
        if self._written_n != self.n:
            self._write(time.monotonic())

    def line(self, now: Optional[float] = None) -> str:
        """The text of a progress line at time ``now``."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        done = self.n - self.initial
        rate = f", {done / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc or 'progress'}: {count} {self.unit}{share}, {elapsed:.1f} s{rate}{postfix}"

    def _write(self, now: float) -> None:
        self._last, self._written_n = now, self.n
        if not self.enabled:
            return
        stream = self.file if self.file is not None else sys.stderr
        stream.write(self.line(now) + "\n")
        stream.flush()


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, leave: bool = True,
                 file: Optional[IO[str]] = None, interval: float = LOG_INTERVAL_S) -> Any:
    """A progress bar over ``iterable``, or updated by hand with ``update(n)``.

    Args:
        iterable: What to iterate over (its length is the total when it has one).
        total: The number of units when there is no iterable or it has no length.
        desc, unit: The bar's label and the name of one unit (``img``, ``epoch``).
        initial: Units already done (a resumed run).
        enabled: ``False``: a bar that writes nothing (the same interface, so callers need no branch).
        leave: In a terminal, keep the finished bar on screen (tqdm's ``leave``).
        file: Where it writes (default: ``sys.stderr``); whether it is a terminal decides the form.
        interval: Seconds between plain lines when ``file`` is not a terminal.

    Returns:
        In a terminal with tqdm installed, a ``tqdm`` bar; else a :class:`LineProgress`. Both
        iterate, take ``update``/``set_postfix``/``close`` and work as context managers.
    """
    stream = file if file is not None else sys.stderr
    if enabled and _is_terminal(stream):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc or None, unit=unit, initial=initial, leave=leave, file=file,
                        dynamic_ncols=True, smoothing=0.05)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, interval=interval,
                        enabled=enabled)

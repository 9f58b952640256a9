"""Progress on long work: count, rate and ETA, printed to stderr at most every `every` seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """A throttled progress line: `label 120/640 (18.8%) 14.2 img/s ETA 00:37`."""

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "img",
        every: float = 2.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        """Count `n` more items done; print a line when `every` seconds have passed."""
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.perf_counter()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        rate = self.rate(now)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = _fmt_seconds(eta) if eta == eta else "--:--"
        return (
            f"{self.label} {self.done}/{self.total} ({pct:.1f}%) "
            f"{rate:.1f} {self.unit}/s ETA {eta_s}"
        )


def quiet_frameworks() -> None:
    """Keep TensorFlow's and absl's chatter (retracing notices, ...) out of a user's output.

    Errors still show. Called wherever Keras is imported; TensorFlow's C++ start-up lines are
    governed by TF_CPP_MIN_LOG_LEVEL, set in pipeline/__init__.py.
    """
    import logging

    for name in ("tensorflow", "absl", "h5py", "distributed.utils_perf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with TensorFlow
        pass

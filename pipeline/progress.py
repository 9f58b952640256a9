"""Progress on long work (count, rate and ETA), and a terminal free of the frameworks' chatter.

Progress lines go where the caller says (`lines_to`): the library's functions send them to
their `log` (none with `log=None`), the command line to stderr. On a terminal the line rewrites
itself in place; into a file, a pipe, a CI log or a `log` function it is a line every ten
seconds or so, the first and the last, never one per update. `quiet_frameworks` keeps
TensorFlow's C++ start-up lines and absl's notices out of a user's output; `VERBOSE=1`
(PIPELINE_VERBOSE=1) shows them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TextIO

Log = Callable[[str], None]


class StreamLines:
    """A `Log` writing each line to `stream` (sys.stderr, as it is at the time, when none).

    Progress looks at its `stream`: a terminal gets one line rewritten in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, line: str) -> None:
        end_line()  # a progress line being rewritten on the terminal ends first
        self.stream.write(line + "\n")
        self.stream.flush()


_stderr = StreamLines()

# the terminal stream whose progress line is being rewritten (no newline yet), if any
_open: list[TextIO] = []


def end_line() -> None:
    """End a progress line left open on a terminal, so that what is printed next (a result, an
    error) starts on a line of its own."""
    while _open:
        stream = _open.pop()
        with contextlib.suppress(OSError, ValueError):
            stream.write("\n")
            stream.flush()


def _isatty(stream: object) -> bool:
    try:
        return bool(stream is not None and stream.isatty())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):  # closed, or no such method
        return False


def _nowhere(line: str) -> None:
    pass


# where Progress lines go; None: nobody said (stderr)
_sink: ContextVar[Log | None] = ContextVar("pipeline_progress_sink", default=None)


@contextlib.contextmanager
def lines_to(log: Log | None, keep_outer: bool = False) -> Iterator[None]:
    """Progress lines made inside go to `log` (None: nowhere).

    `keep_outer`: an outer `lines_to` (the command line's, to stderr) keeps its say, except that
    `log=None` always silences.
    """
    if keep_outer and log is not None and _sink.get() is not None:
        yield
        return
    token = _sink.set(_nowhere if log is None else log)
    try:
        yield
    finally:
        _sink.reset(token)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """A throttled progress line: `label 120/640 (18.8%) 14.2 img/s ETA 00:37`.

    Printed to `stream` if given, else where `lines_to` says (by default stderr). On a
    terminal (a stream whose `isatty()` is true) the line is rewritten in place (`\\r`) at
    most every `every` seconds and ended with a newline when the work is done; anywhere else
    (a file, a pipe, a CI log, a `log` function) the first update and the last are printed and
    one line in between every `log_every` seconds. `clock` is for the tests.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "img",
        every: float = 0.5,
        stream: TextIO | None = None,
        log_every: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream
        self.say: Log = _sink.get() or _stderr
        target = stream if stream is not None else getattr(self.say, "stream", None)
        self.tty = _isatty(target)
        self._target = target
        self.every = every if self.tty else max(every, log_every)
        self.clock = clock
        self.done = 0
        self.start = clock()
        self._last: float | None = None  # when the last line was printed; None: none yet
        self._width = 0

    def update(self, n: int) -> None:
        """Count `n` more items done; print a line if it is the first, the last, or `every`
        seconds (`log_every` off a terminal) have passed since the last one."""
        self.done += n
        now = self.clock()
        last = self.done >= self.total
        if not (last or self._last is None or now - self._last >= self.every):
            return
        self._last = now
        line = self.line(now)
        if self.tty:
            out = self._target
            pad = " " * max(0, self._width - len(line))  # what a longer line left behind
            self._width = len(line)
            if out in _open:
                _open.remove(out)
            out.write("\r" + line + pad + ("\n" if last else ""))  # type: ignore[union-attr]
            out.flush()  # type: ignore[union-attr]
            if not last:
                _open.append(out)  # type: ignore[arg-type]
        elif self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            self.say(line)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else self.clock()) - self.start
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


def verbose() -> bool:
    """VERBOSE=1 (PIPELINE_VERBOSE=1 in the environment): the frameworks' own lines are shown."""
    return os.environ.get("PIPELINE_VERBOSE", "").strip() not in ("", "0")


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file for the duration; given back to stderr only if
    the block fails (C++ libraries write there before Python's logging can say anything)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 to hold (closed, or not a real file)
        saved = -1
    try:
        held_file = tempfile.TemporaryFile() if saved >= 0 else None
    except OSError:  # no room for a temporary file (a full disk): the chatter is not held
        held_file = None
    if held_file is None:
        if saved >= 0:
            os.close(saved)
        yield
        return
    with held_file as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))
                sys.stderr.flush()


def quiet_frameworks() -> None:
    """Import TensorFlow without its C++ start-up lines; keep absl's and TensorFlow's Python
    notices (retracing, ...) out of a user's output. Errors still show.

    Called before Keras is imported (`backbone._keras`, `keras_heads._keras`). TensorFlow prints
    "Could not find cuda drivers", "failed call to cuInit" and the like from C++ while it loads
    and finds its devices, before any log level applies to them: both happen here, with fd 2
    held (and its content dropped unless the import fails). Later C++ lines below ERROR are
    governed by TF_CPP_MIN_LOG_LEVEL (set in pipeline/__init__.py). VERBOSE=1: nothing held.
    """
    if verbose():
        return
    if "tensorflow" not in sys.modules and os.environ.get("KERAS_BACKEND") in (None, "tensorflow"):
        with held_stderr():
            import tensorflow as tf

            tf.config.list_physical_devices()  # initialises the platforms (cuInit) here
    import logging

    for name in ("tensorflow", "absl", "h5py", "distributed.utils_perf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with TensorFlow
        pass

"""Progress that suits where it goes: rewritten in place on a terminal, a line every ten seconds
or so (the first and the last) into a file, a pipe, a CI log or a `log` function."""

from __future__ import annotations

import io

from pipeline.progress import Progress, StreamLines, end_line, lines_to


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_rapid_updates_print_the_first_and_the_last_line():
    clock, out = Clock(), io.StringIO()
    p = Progress(50, "cross-validation", unit="folds", every=0.0, stream=out, clock=clock)
    for _ in range(25):
        clock.now += 0.01
        p.update(1)
    assert len(out.getvalue().splitlines()) == 1  # the first: work has started
    clock.now += 10.0  # ten seconds on: one more line
    p.update(1)
    assert len(out.getvalue().splitlines()) == 2
    for _ in range(24):
        clock.now += 0.01
        p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines  # and the last
    assert lines[-1].startswith("cross-validation 50/50 (100.0%)")
    assert "\r" not in out.getvalue()


def test_a_log_function_is_not_a_terminal():
    clock, lines = Clock(), []
    with lines_to(lines.append):
        p = Progress(200, "embedding", every=0.0, clock=clock)
        for _ in range(200):
            clock.now += 0.001
            p.update(1)
    assert [ln.split(" (")[0] for ln in lines] == ["embedding 1/200", "embedding 200/200"]


def test_on_a_terminal_the_line_is_rewritten_in_place():
    clock, tty = Clock(), Terminal()
    with lines_to(StreamLines(tty)):
        p = Progress(3, "embedding", every=0.0, clock=clock)
        for _ in range(3):
            clock.now += 1.0
            p.update(1)
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert [part.split(" (")[0] for part in text.split("\r")[1:]] == [
        "embedding 1/3", "embedding 2/3", "embedding 3/3",
    ]  # fmt: skip


def test_a_line_left_open_on_a_terminal_is_ended_before_the_next():
    clock, tty = Clock(), Terminal()
    say = StreamLines(tty)
    with lines_to(say):
        p = Progress(10, "embedding", stream=tty, every=0.0, clock=clock)
        p.update(1)
        say("error: the disk is full")  # work stopped half-way: the message on its own line
    end_line()
    assert tty.getvalue().startswith("\rembedding 1/10")
    assert tty.getvalue().splitlines()[-1] == "error: the disk is full"

"""Command line: `python -m pipeline <command>`; the Makefile's targets call these commands.

A user error (bad data, settings or order of commands) prints one line and exits with code 2;
a full disk (or quota, or file-size limit) prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any

from pipeline import settings
from pipeline.errors import UserError
from pipeline.settings_base import setting_of

EPILOG = "Every option has a Makefile variable of the same name in capitals (make help)."


def _add(p: argparse.ArgumentParser, f: dataclasses.Field[Any]) -> None:
    """One setting as an option: its flag, default, help and parsing from its `Setting`."""
    s = setting_of(f)
    kw: dict[str, Any] = {"default": s.default, "dest": f.name}
    kw["help"] = s.help() if callable(s.help) else s.help
    if s.kind == "bool":  # on/off: --verify, or --no-race where the default is on
        kw["action"] = "store_false" if s.default else "store_true"
    else:
        kw["type"] = functools.partial(s.parse, f.name)
    if kw["default"] is dataclasses.MISSING:
        del kw["default"]
    p.add_argument(s.option(f.name), **{**kw, **s.cli})


def parser() -> argparse.ArgumentParser:
    """The command line, built from `pipeline.settings`: a command per settings class, an
    option per field."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Transfer learning done right: cache VGG16 features once, train and "
        "cross-validate heads on the cache, compare them in one report.",
        epilog=EPILOG,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for cls in settings.COMMANDS:
        about = cls.description() if callable(cls.description) else cls.description
        p = sub.add_parser(cls.command, help=cls.summary, description=about, epilog=EPILOG)
        for f in dataclasses.fields(cls):
            _add(p, f)
    return ap


# each command's function in `pipeline.api`; its options are that function's parameters
COMMANDS = {c.command: c.function for c in settings.COMMANDS if c is not settings.DemoSettings}
BY_NAME = {c.command: c for c in settings.COMMANDS}


def options(args: argparse.Namespace) -> settings.Settings:
    """The parsed command line as its command's settings (checked: a UserError refuses one)."""
    cls = BY_NAME[args.command]
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run(s: settings.Settings) -> None:
    """Run one command through `pipeline.api`, the functions a script calls, with its
    settings."""
    from pipeline import api
    from pipeline.progress import StreamLines, end_line, lines_to

    def log(s: str) -> None:
        end_line()  # a progress line rewritten on the terminal ends before a result's line
        print(s, flush=True)

    with lines_to(StreamLines()):  # progress: stderr, rewritten in place on a terminal
        if isinstance(s, settings.DemoSettings):
            from pipeline.demo import run_demo

            run_demo(s, log=log)
        elif isinstance(s, settings.PredictSettings):  # row by row, none kept: memory flat
            for _ in api.predict_rows(s, log=log):
                pass
        else:
            getattr(api, s.function)(s, log=log)


def main(argv: list[str] | None = None) -> int:
    # past `ulimit -f` a write fails with EFBIG (one line): CPython ignores SIGXFSZ at start
    from pipeline.progress import end_line

    try:
        s = options(parser().parse_args(argv))
    except UserError as e:  # a setting refused while the command line is read
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        run(s)
    except UserError as e:  # 2; no room on the disk (DiskFull): 1
        end_line()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        end_line()
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        end_line()
    return 0

"""How a setting is defined once: `Setting` (default, help, Makefile variable, kind, check),
`Settings` (a command's settings, checked when made) and `takes` (a function taking them).

The settings themselves, one frozen dataclass per command, are in `pipeline.settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipeline.errors import UserError

PathLike = str | os.PathLike[str]
Params = Mapping[str, Any] | Iterable[str] | str | None
Check = Callable[[str, Any], str | None]  # (name, value) -> why it is refused, or None


def expand(text: str) -> Path | str:
    """A path from the command line: `~` expanded (the Makefile quotes paths, so the shell
    does not); empty stays "" for the setting's check (Path("") would be this folder)."""
    return Path(text).expanduser() if text else text


def _setting(v: Any) -> str:
    """A value as PARAMS would spell it: 50.0 -> "50" (an integer setting accepts it)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def head_params(params: Params) -> dict[str, str]:
    """PARAMS as the head reads them: "C=0.1 epochs=5", ["C=0.1"] or {"C": 0.1}."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return {str(k).strip(): _setting(v) for k, v in params.items()}
    items = params.split() if isinstance(params, str) else list(params)
    out = {}
    for v in items:
        if "=" not in v:
            raise UserError(f"head setting '{v}' must look like name=value, e.g. C=0.1")
        k, _, val = v.partition("=")
        out[k.strip()] = val.strip()
    return out


def names(value: str | Iterable[Any]) -> str:
    """A comma-separated setting (SWEEP_HEADS=logreg,svm) from a string or a list."""
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def at_least(low: float, what: str) -> Check:
    """A number (or None: the default) of at least `low`; `what` says which in the refusal."""

    def check(name: str, v: Any) -> str | None:
        return None if v is None or v >= low else f"{name} must be {what}; got {v}"

    return check


def above(low: float, what: str) -> Check:
    """A number (or None) greater than `low`."""

    def check(name: str, v: Any) -> str | None:
        return None if v is None or v > low else f"{name} must be {what}; got {v}"

    return check


def one_of(*choices: str) -> Check:
    """One of `choices`, spelled exactly."""

    def check(name: str, v: Any) -> str | None:
        return None if v in choices else f"{name} must be one of {', '.join(choices)}; got '{v}'"

    return check


def not_empty(name: str, v: Any) -> str | None:
    """IMAGES: never empty (an empty path would be the current folder, classified whole)."""
    if isinstance(v, str | os.PathLike) and not os.fspath(v).strip():
        return (
            f"{name} is empty; name what to classify: make predict {name}=path/to/image-or-folder"
            " (or a .txt/.csv list)"
        )
    return None


def _zero_or_one(text: str) -> bool:
    """MAPS=0|1 on the command line."""
    if text.strip() not in ("0", "1"):
        raise ValueError(text)
    return text.strip() == "1"


WORDS = {"int": "a whole number", "float": "a number", "bool01": "0 or 1"}
PARSE: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "path": expand,
    "str": str,
    "names": str,
    "params": str,
    "bool01": _zero_or_one,
}


@dataclass(frozen=True)
class Setting:
    """One setting: its default, help (`%(default)s` is the default), Makefile variable (None:
    command line and Python only), kind, check and command-line spelling.

    `kind`: int, float (checked and parsed as such), str, path (a Path; on the command line
    `~` is home), names (a comma-separated string, or a list joined), params (PARAMS), bool
    (an on/off option: --name, or `flag` --no-name where the default is on) or bool01
    (0 or 1 on the command line). A `Setting` called makes the dataclass field, with changes
    for one command (`BATCH(make=None)`).
    """

    default: Any
    help: str | Callable[[], str]
    make: str | None
    kind: str = "str"
    check: Check | None = None
    flag: str = ""  # default --<field name>
    cli: Mapping[str, Any] = field(default_factory=dict)  # more argparse keywords

    def __call__(self, **change: Any) -> Any:
        s = dataclasses.replace(self, **change) if change else self
        return field(default=s.default, metadata={"setting": s})

    def option(self, field_name: str) -> str:
        return self.flag or "--" + field_name.replace("_", "-")

    def name(self, field_name: str) -> str:
        """What a refusal calls it: the Makefile variable, else the command-line option."""
        return self.make or self.option(field_name)

    def parse(self, field_name: str, text: str) -> Any:
        """A command-line value; text that is not one is a one-line UserError naming it."""
        try:
            return PARSE[self.kind](text)
        except ValueError:
            raise UserError(
                f"{self.name(field_name)} must be {WORDS[self.kind]}; got '{text}'"
            ) from None

    def value(self, field_name: str, v: Any) -> Any:
        """`v` checked and in its one form (a Path, a dict of PARAMS, a comma string)."""
        name = self.name(field_name)
        number = {"int": numbers.Integral, "float": numbers.Real}.get(self.kind)
        if number is not None and v is not None:
            if isinstance(v, bool) or not isinstance(v, number):
                raise UserError(f"{name} must be {WORDS[self.kind]}; got {v!r}")
        if self.check is not None and (why := self.check(name, v)) is not None:
            raise UserError(why)
        if v is None:
            return v
        if self.kind == "path" and isinstance(v, str | os.PathLike):
            # an optional path given empty is not given (an empty path would be this folder)
            return None if self.default is None and not os.fspath(v) else Path(v)
        if self.kind == "names":
            return names(v)
        if self.kind == "params":
            return head_params(v)
        return v


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    """The `Setting` a settings dataclass field was made from."""
    return f.metadata["setting"]


S = TypeVar("S", bound="Settings")
R = TypeVar("R")


@dataclass(frozen=True)
class Settings:
    """A command's settings, checked when made (see the module docstring)."""

    command: ClassVar[str]  # the `python -m pipeline` command (and Makefile target)
    function: ClassVar[str]  # its function in `pipeline.api`
    summary: ClassVar[str]  # its line in `python -m pipeline --help`
    description: ClassVar[str | Callable[[], str] | None] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, setting_of(f).value(f.name, getattr(self, f.name)))

    @classmethod
    def of(cls: type[S], other: Settings, **change: Any) -> S:
        """This command's settings from another's: the fields they share, then `change`."""
        mine = {f.name for f in fields(cls)}
        shared = {f.name: getattr(other, f.name) for f in fields(other) if f.name in mine}
        return cls(**{**shared, **change})


def takes(cls: type[Settings]) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """`fn(settings, **own)` as a command's function: called with a `cls` object (and changes
    by name), or with its fields, in field order or by name, like any keyword function; the
    function's own parameters after the first (`log`) by name. The signature says so."""

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        sig = inspect.signature(fn)
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in list(sig.parameters.values())[1:]]
        mine = {p.name for p in own}

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> R:
            extra = {k: kw.pop(k) for k in list(kw) if k in mine}
            if args and isinstance(args[0], cls):
                if len(args) > 1:
                    raise TypeError(f"{fn.__name__}() takes one {cls.__name__} or its fields")
                s = dataclasses.replace(args[0], **kw) if kw else args[0]
            else:
                s = cls(*args, **kw)
            return fn(s, **extra)

        P = inspect.Parameter
        params = [
            P(f.name, P.POSITIONAL_OR_KEYWORD, annotation=f.type,
              default=P.empty if f.default is dataclasses.MISSING else f.default)
            for f in fields(cls)
        ]  # fmt: skip
        call.__signature__ = sig.replace(parameters=params + own)  # type: ignore[attr-defined]
        return call

    return wrap

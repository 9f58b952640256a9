"""Settings defined once (`pipeline.settings`): the command line, the Python functions and the
Makefile's `takes.<target>` lists, defaults and recipes all agree with the dataclasses, and a
refused value is one line naming the setting."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import pipeline
from pipeline import cli, settings
from pipeline.errors import UserError
from pipeline.settings_base import setting_of

ROOT = Path(__file__).parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()
BY_COMMAND = {c.command: c for c in settings.COMMANDS}
MISSING = dataclasses.MISSING

# a Makefile default a command does not take as its own (its recipe passes the setting only
# when the user gave it): the command's default is the trained run's choice
NOT_THE_MAKEFILES = {
    ("predict", "WEIGHTS"): "passed only when not imagenet; default: where `features` found it",
    ("predict", "BACKBONE"): "passed only when given; default: the run's backbone",
    ("sweep", "DATA"): "passed with SWEEP_BACKBONES only; without it the current cache is used",
}


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _cli_problems(ap: argparse.ArgumentParser) -> list[str]:
    """Where the command line and the settings dataclasses differ (empty: they agree)."""
    subs = _subparsers(ap)
    out = [f"command '{c}' has no settings class" for c in subs if c not in BY_COMMAND]
    out += [f"settings of '{c}' have no command" for c in BY_COMMAND if c not in subs]
    for name, p in subs.items():
        cls = BY_COMMAND.get(name)
        if cls is None:
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        actions = {a.dest: a for a in p._actions if not isinstance(a, argparse._HelpAction)}
        for dest, a in actions.items():
            f = fields.get(dest)
            if f is None:
                out.append(f"{name} {'/'.join(a.option_strings)}: no field of {cls.__name__}")
                continue
            s = setting_of(f)
            if a.option_strings != [s.option(dest)]:
                out.append(f"{name} {a.option_strings}: the field says {s.option(dest)}")
            want = None if f.default is MISSING else f.default
            if a.default != want:
                out.append(f"{name} {s.option(dest)}: default {a.default!r}, field {want!r}")
            if a.required != (f.default is MISSING):
                out.append(f"{name} {s.option(dest)}: required is {a.required}")
        out += [f"{name}: field {n} has no option" for n in fields if n not in actions]
    return out


def test_the_command_line_is_the_settings_dataclasses():
    assert _cli_problems(cli.parser()) == []


def test_an_option_without_a_field_or_with_another_default_is_found():
    ap = cli.parser()
    subs = _subparsers(ap)
    subs["predict"].add_argument("--shiny", default=1, help="not a setting")
    next(a for a in subs["features"]._actions if a.dest == "batch").default = 64
    problems = _cli_problems(ap)
    assert any("predict --shiny: no field of PredictSettings" in p for p in problems), problems
    assert any("features --batch: default 64, field 32" in p for p in problems), problems


def _takes(text: str) -> dict[str, set[str]]:
    """target -> the settings its `takes.<target>` line lists (conditional ones too)."""
    lines = re.findall(r"^takes\.([a-z-]+)\s*:?=(.*)$", text, flags=re.M)
    return {t: set(re.findall(r"\b[A-Z][A-Z_]+\b", body)) for t, body in lines}


def _make_names(cls: type[settings.Settings]) -> dict[str, str]:
    """Makefile variable -> field, as the fields' metadata says (`make=`)."""
    return {setting_of(f).make: f.name for f in dataclasses.fields(cls) if setting_of(f).make}


def _takes_problems(text: str) -> list[str]:
    takes, out = _takes(text), []
    for command, cls in BY_COMMAND.items():
        listed, fields = takes.get(command), set(_make_names(cls))
        if listed is None:
            out.append(f"no takes.{command} line")
            continue
        out += [f"takes.{command} lacks {v} ({cls.__name__} has it)" for v in fields - listed]
        out += [f"takes.{command} lists {v}, no field of {cls.__name__}" for v in listed - fields]
    return out


def test_every_makefile_takes_list_is_its_commands_fields():
    assert _takes_problems(MAKEFILE) == []


def test_a_takes_list_missing_a_field_or_listing_another_is_found():
    text = re.sub(r"^(takes\.features .*) BATCH ", r"\1 ", MAKEFILE, flags=re.M)
    text = text.replace("takes.report     := ARTIFACTS GALLERY", "takes.report := ARTIFACTS RUN")
    assert text != MAKEFILE
    assert sorted(_takes_problems(text)) == [
        "takes.features lacks BATCH (ExtractSettings has it)",
        "takes.report lacks GALLERY (ReportSettings has it)",
        "takes.report lists RUN, no field of ReportSettings",
    ]


def _recipes(text: str) -> dict[str, str]:
    """target -> its recipe, the helper variables (pool_arg = ...) written out."""
    text = text.replace("\\\n", " ")
    helpers = dict(re.findall(r"^([a-z_]+)\s*=\s*(.*)$", text, flags=re.M))
    recipes = dict(re.findall(r"^([a-z-]+):[^\n]*\n((?:\t[^\n]*\n)+)", text, flags=re.M))
    for _ in range(3):
        recipes = {
            t: re.sub(r"\$\(([a-z_]+)\)", lambda m: helpers.get(m[1], m[0]), body)
            for t, body in recipes.items()
        }
    return recipes


def _passes(recipe: str, var: str, option: str) -> bool:
    """Whether the recipe hands Makefile variable `var` to the command as `option`."""
    v = re.escape(var)
    o = re.escape(option)
    value = rf"(\$\(call q,{v}\)|\$\({v}\)|\$\(or \$\({v}\),[^)]*\))"
    return bool(
        re.search(rf"{o} {value}", recipe)  # --batch $(BATCH)
        or re.search(rf"\$\(if \$\(filter [01],\$\({v}\)\),{o}\)", recipe)  # --rebuild, --no-race
        or re.search(rf"\$\(foreach (\w),\$\({v}\),{o} \$\(\1\)\)", recipe)  # --param, repeated
    )


def test_every_recipe_passes_each_setting_to_its_option():
    recipes = _recipes(MAKEFILE)
    for command, cls in BY_COMMAND.items():
        for var, name in _make_names(cls).items():
            option = setting_of(cls.__dataclass_fields__[name]).option(name)
            assert _passes(recipes[command], var, option), f"make {command}: {var} -> {option}"
    wrong = _recipes(MAKEFILE.replace("--batch $(BATCH)", "--batch-size $(BATCH)"))
    assert not _passes(wrong["features"], "BATCH", "--batch")


def _shown(v: object) -> str:
    """A default as the Makefile spells it (MAPS=1, REBUILD=0, SIZE= for None)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def test_the_makefiles_defaults_are_the_settings_defaults():
    """A `VAR ?= value` default is its fields' default; `$(or $(VAR),x)` in a recipe too (a
    second spelling the Makefile needs for `make help`, checked here)."""
    defaults = dict(re.findall(r"^([A-Z][A-Z_]*)\s*\?=[ \t]*(.*?)\s*$", MAKEFILE, flags=re.M))
    recipes = _recipes(MAKEFILE)
    checked = 0
    for command, cls in BY_COMMAND.items():
        for var, name in _make_names(cls).items():
            default = cls.__dataclass_fields__[name].default
            if default is MISSING or (command, var) in NOT_THE_MAKEFILES:
                continue
            given = re.search(rf"\$\(or \$\({var}\),([^)]*)\)", recipes[command])
            make = given[1] if given and not defaults.get(var) else defaults.get(var, "")
            if make:  # an empty one (SIZE=) is not passed on: the command's default applies
                assert make == _shown(default), f"make {command}: {var}={make}, {name}={default}"
                checked += 1
    assert checked >= 30, checked


def test_a_setting_shared_by_commands_has_one_default():
    """The same Makefile variable has the same default in every command, but for these."""
    differ = {
        ("finetune", "folds"), ("demo", "folds"), ("demo", "size"), ("sweep", "data"),
        ("export", "pool"), ("predict", "weights"), ("predict", "backbone"),
    }  # fmt: skip
    first: dict[str, object] = {}
    for command, cls in BY_COMMAND.items():
        for f in dataclasses.fields(cls):
            if (command, f.name) in differ:
                continue
            name = setting_of(f).name(f.name)  # SWEEP_VIEWS is not VIEWS
            got = first.setdefault(name, f.default)
            assert got == f.default, f"{command}: {name}={f.default!r}, elsewhere {got!r}"


@pytest.mark.parametrize("cls", settings.COMMANDS, ids=lambda c: c.command)
def test_each_function_takes_its_settings_or_their_fields(cls):
    """Its signature is the fields (same order and defaults) and then `log`."""
    if cls is settings.DemoSettings:
        from pipeline.demo import run_demo as fn
    else:
        fn = getattr(pipeline, cls.function)
    params = list(inspect.signature(fn).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params[: len(fields)]] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=False):
        assert p.default == (p.empty if f.default is MISSING else f.default), f.name
    assert "log" in [p.name for p in params[len(fields) :]]


def test_a_settings_object_or_its_fields_run_the_same(tmp_path):
    with pytest.raises(UserError) as by_fields:
        pipeline.export(tmp_path, pool="max", log=None)
    s = settings.ExportSettings(artifacts=tmp_path, pool="max")
    with pytest.raises(UserError) as by_object:
        pipeline.export(s, log=None)
    assert str(by_fields.value) == str(by_object.value) and "make features" in str(by_object.value)
    assert settings.ExportSettings(tmp_path, "csv") == settings.ExportSettings(
        artifacts=str(tmp_path), format="csv"
    )  # one form: paths are Paths


@pytest.mark.parametrize(
    "argv, said",
    [
        (["features", "--batch", "0"], "BATCH must be a positive integer; got 0"),
        (["features", "--batch", "many"], "BATCH must be a whole number; got 'many'"),
        (["features", "--maps", "2"], "MAPS must be 0 or 1; got '2'"),
        (["features", "--augment", "-1"], "AUGMENT must be 0 or a positive number of views"),
        (["train-head", "--folds", "1"], "FOLDS must be at least 2; got 1"),
        (["train-head", "--views", "-2"], "VIEWS must be 0 or a positive number of views"),
        (["train-head", "--param", "C"], "head setting 'C' must look like name=value"),
        (["finetune", "--repeats", "0"], "REPEATS must be 1 or more; got 0"),
        (["sweep", "--budget", "0"], "BUDGET must be a positive number of minutes; got 0.0"),
        (["sweep", "--margin", "x"], "--margin must be a number; got 'x'"),
        (["predict", "--images", ""], "IMAGES is empty; name what to classify"),
        (["predict", "--images", "a", "--tta", "-1"], "TTA must be 0 or a positive number"),
        (["predict", "--images", "a", "--topk", "-1"], "TOPK must be 0 or a positive number"),
        (["export", "--format", "xls"], "FORMAT must be one of npz, csv; got 'xls'"),
    ],
)
def test_a_refused_value_is_one_line_naming_it(argv, said, capsys, tmp_path):
    assert cli.main([*argv, "--artifacts", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], captured.err
    assert captured.out == "" and not list(tmp_path.iterdir())  # refused before any work


def test_the_functions_refuse_the_same_values_by_name(tmp_path):
    with pytest.raises(UserError, match=r"^BATCH must be a positive integer; got 0$"):
        pipeline.extract(tmp_path, tmp_path / "a", batch=0, log=None)
    with pytest.raises(UserError, match=r"^FOLDS must be a whole number; got '3'$"):
        pipeline.train_head(tmp_path, folds="3", log=None)
    with pytest.raises(UserError, match="^IMAGES is empty"):
        pipeline.predict("", tmp_path, log=None)  # not the current folder, classified whole
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        pipeline.extract(tmp_path, batchsize=8, log=None)


def test_the_sweeps_extraction_is_the_features_settings_with_precision_auto(tmp_path, monkeypatch):
    """SWEEP_BACKBONES extracts with `ExtractSettings` (not a dict whose precision fell back
    to float32): `make sweep` and `make features` compute the same cache by default."""
    s = settings.SweepSettings(artifacts=tmp_path, backbones="vgg16", data=tmp_path / "d")
    e = s.extraction()
    assert isinstance(e, settings.ExtractSettings) and e.precision == "auto"
    assert e == settings.ExtractSettings(data=tmp_path / "d", artifacts=tmp_path)
    assert settings.SweepSettings().extraction() is None  # no DATA: the current cache only

    seen = []

    class Stop(Exception):
        pass

    def run(self, log, set_current=True, embedder_fn=None):
        seen.append(self)
        raise Stop

    monkeypatch.setattr(settings.ExtractSettings, "run", run)
    with pytest.raises(Stop):
        pipeline.sweep(tmp_path, backbones="vgg16", data=tmp_path / "d", log=None)
    assert seen[0].precision == "auto" and seen[0].backbone == "vgg16"
    assert seen[0].spec() == settings.ExtractSettings(tmp_path / "d", tmp_path).spec()
    with pytest.raises(UserError, match="SWEEP_BACKBONES needs DATA"):
        pipeline.sweep(tmp_path, backbones="vgg16", log=None)

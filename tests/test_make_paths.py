"""Any path works through make: each path setting reaches the command as one word, exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = [
    "with space",
    'double "quote"',
    "single 'quote'",
    "dollar $HOME and $(x) $$",
    "back\\slash",
    "comma, here",
    "non-ASCII éüß 写真",
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A VENV whose python prints the arguments it was given (make's recipe is what's tested)."""
    v = tmp_path_factory.mktemp("venv")
    (v / "bin").mkdir()
    py = v / "bin" / "python"
    show = "import json,sys; print(json.dumps(sys.argv[1:]))"
    py.write_text(f"#!/bin/sh\nexec python3 -c '{show}' \"$@\"\n")
    py.chmod(0o755)
    stamp = v / ".installed-stamp"
    stamp.touch()
    t = (ROOT / "pyproject.toml").stat().st_mtime + 3600
    os.utime(stamp, (t, t))
    return v


def argv(venv: Path, target: str, **settings: str) -> list[str]:
    out = (
        subprocess.run(
            ["make", "--no-print-directory", "-s", target, f"VENV={venv}"]
            + [f"{k}={v}" for k, v in settings.items()],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    return json.loads(out[-1])


def after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("name", HOSTILE)
def test_every_path_setting_reaches_the_command_as_typed(venv, tmp_path, name):
    p = str(tmp_path / name)
    a = argv(venv, "features", DATA=p + "/data", ARTIFACTS=p + "/art", WEIGHTS=p + "/w.h5")
    assert after(a, "--data") == p + "/data"
    assert after(a, "--artifacts") == p + "/art"
    assert after(a, "--weights") == p + "/w.h5"
    a = argv(venv, "predict", IMAGES=p + "/new", OUT=p + "/out.csv", WEIGHTS=p + "/w.h5")
    assert after(a, "--images") == p + "/new"
    assert after(a, "--out") == p + "/out.csv"
    assert after(a, "--weights") == p + "/w.h5"
    a = argv(venv, "demo", ARTIFACTS=p)
    assert after(a, "--artifacts") == p + "/demo"
    a = argv(venv, "export", OUT=p + "/f.npz", ARTIFACTS=p)
    assert (after(a, "--out"), after(a, "--artifacts")) == (p + "/f.npz", p)

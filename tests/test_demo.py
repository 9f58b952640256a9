"""`make demo` end to end, as a user runs it, on a small sample of the digits: the Makefile's
recipe, the command line, the sample written, features, the three heads and the report; and,
where the ImageNet weights cannot be had, the random-weights banner said and repeated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache_identity import RANDOM_BANNER

ROOT = Path(__file__).resolve().parents[1]

# what `$(PY) -m pipeline demo ...` runs here: the demo itself, on 5 digits a class at 32 px
# with 2 folds (the whole set at 64 px and 5 folds is minutes of a real `make demo`), its dense
# head trained for 5 epochs at most instead of 100 (how well it learns is not checked here)
TINY = """\
import dataclasses, inspect, sys
from pipeline import cli, demo, keras_heads

real = demo.run_demo
init = keras_heads.DenseHead.__init__
names = list(inspect.signature(init).parameters)[1:]
defaults = dict(zip(names, init.__defaults__, strict=True))
assert defaults["epochs"] == 100, defaults  # the dense head's own default
init.__defaults__ = tuple(5 if n == "epochs" else defaults[n] for n in names)


def tiny(s, per_class=None, log=print):
    assert per_class is None and s.size == 64 and s.folds == 5  # the demo's own defaults
    return real(dataclasses.replace(s, size=32, folds=2), per_class=5, log=log)


demo.run_demo = tiny
assert sys.argv[1:3] == ["-m", "pipeline"], sys.argv
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A VENV whose python runs the project's interpreter through TINY (installed: its stamp
    is newer than pyproject.toml, so make installs nothing)."""
    v = tmp_path / "venv"
    (v / "bin").mkdir(parents=True)
    (tmp_path / "tiny.py").write_text(TINY)
    py = v / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "tiny.py"}" "$@"\n')
    py.chmod(0o755)
    stamp = v / ".installed-stamp"
    stamp.touch()
    t = (ROOT / "pyproject.toml").stat().st_mtime + 3600
    os.utime(stamp, (t, t))
    return v


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_end_to_end_says_when_its_weights_are_random(venv: Path, tmp_path: Path):
    art = tmp_path / "art"
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),  # no weights file kept from an earlier download
        # no download either, at once: every request goes to a closed local port
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
        # the folds one after another in the command's process: no pool of worker processes
        # started for each head (seconds apiece; the folds are not what is checked here)
        "JOBLIB_MULTIPROCESSING": "0",
    }
    p = subprocess.run(
        ["make", "--no-print-directory", "-s", "demo", f"VENV={venv}", f"ARTIFACTS={art}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    lines = p.stdout.splitlines()
    demo = art / "demo"  # ARTIFACTS/demo: the Makefile's recipe
    assert f"demo dataset: {demo / 'demo-data'} (scikit-learn digits as PNGs)" in lines
    # WEIGHTS=imagenet (the default) could not be had: the demo says so and goes on, bannered
    warned = [ln for ln in lines if ln.startswith("warning: could not download the ImageNet")]
    assert len(warned) == 1, lines
    banner = f"*** the demo continues with random weights. {RANDOM_BANNER} ***"
    assert lines.index(banner) == lines.index(warned[0]) + 1
    assert f"*** {RANDOM_BANNER} ***" in lines  # and the features say it again
    # the sample: 5 digits a class, a fifth of them for validation
    data = demo / "demo-data"
    assert sorted(q.name for q in (data / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(list(data.glob("train/*/*.png"))) == 40
    assert len(list(data.glob("validation/*/*.png"))) == 10
    # the three heads, cross-validated on 2 folds, in the report under its banner
    rep = json.loads((demo / "report/report.json").read_text())
    assert rep["banner"] == RANDOM_BANNER
    assert sorted(e["head"] for e in rep["results"]) == ["dense", "logreg", "svm"]
    assert all(e["cv_folds"] == 2 for e in rep["results"])
    assert RANDOM_BANNER in (demo / "report/report.md").read_text()
    assert RANDOM_BANNER in (demo / "report/report.html").read_text()
    results = [json.loads(q.read_text()) for q in (demo / "heads").glob("*/result.json")]
    assert len(results) == 3
    assert {r["features"]["settings"]["input_size"] for r in results} == {32}

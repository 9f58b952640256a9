"""The HTML report in a real browser: headless Chromium (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_dataset, write_image

from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.train import train_head

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Put first in <head>: records errors and console errors, then, once everything has loaded,
# writes what the page shows (images decoded, sections, overflow) into the DOM for --dump-dom.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + e.message), true);
const _ce = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); _ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, ok: i.complete}));
  const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
  const out = {imgs, ids, errors: window.__errors,
    mistakes: document.querySelectorAll('.mistakes figure').length,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    text: document.body.innerText.slice(0, 20000)};
  const pre = document.createElement('pre'); pre.id = '__result';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def open_in_chromium(page: Path, tmp: Path, width: int = 390) -> tuple[dict, str]:
    probe = tmp / "probed.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    p = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--window-size={width},900",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="__result">(.*?)</pre>', p.stdout, re.S)
    assert m, p.stderr[-3000:]
    import html

    return json.loads(html.unescape(m.group(1))), p.stderr


def test_report_in_a_real_browser(tmp_path, spec, quiet):
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_CHROMIUM"):  # CI: a missing browser fails, never skips
            pytest.fail("chromium is not installed and REQUIRE_CHROMIUM is set (.ci/run)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=8, validation=3)
    evil = "<b onmouseover=alert(1)>x"
    (data / "train/class_2").rename(data / "train" / evil)
    (data / "validation/class_2").rename(data / "validation" / evil)
    # mislabelled images: the gallery has mistakes to show; an unreadable file: a skipped one
    for i in range(3):
        write_image(data / f"validation/class_0/wrong{i}.png", 1, 900 + i)
    (data / "train/class_0/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    train_head(art, "logreg", folds=3, log=log)
    train_head(art, "svm", folds=3, log=log)
    rep = build_report(art, log=log)
    page = art / "report/report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # no network resource
    assert evil not in text and "&lt;b onmouseover=alert(1)&gt;x" in text
    got, stderr = open_in_chromium(page, tmp_path)
    assert got["errors"] == [], got["errors"]
    assert "Uncaught" not in stderr and "CONSOLE" not in stderr.replace("INFO:CONSOLE", "")
    assert got["imgs"] and all(i["ok"] and i["w"] > 0 for i in got["imgs"]), got["imgs"]
    n_thumbs = sum(len(g["items"]) for g in rep["galleries"])
    assert len(got["imgs"]) == 2 + 1 + n_thumbs  # 2 confusion matrices, comparison, gallery
    assert got["mistakes"] == n_thumbs >= 3
    for section in ("banner", "evaluated", "meaning", "ranking", "runs", "skipped"):
        assert section in got["ids"], section
    assert got["overflow"] <= 2, got["overflow"]  # readable at a phone's width
    shown = got["text"]
    for needle in ("What was evaluated", "vgg16", "class_0", evil, "broken.jpg", "Mistakes of",
                   "predicted", "corrected resampled t test"):  # fmt: skip
        assert needle in shown, needle

"""The report's "Know your data" section (`make audit` shown by `make report`), end to end.

A small collection of generated photos-like fields (tests/test_auditing.py's), two labels
flipped on purpose, near copies (one of them in validation: a leak) and one image of another
kind; embedded by a seeded random-weights VGG16, two heads trained, the best audited. The
report then shows the audit with its thumbnails; an audit that no longer describes its run
or the data is shown stale, never as current; and in Chromium every image decodes and the
page fits a phone's width.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_auditing import other_kind, photo, save
from test_report_browser import CHROMIUM, FLAGS, open_in_chromium

from pipeline import auditing, report_audit
from pipeline.backbone import BackboneSpec
from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.train import train_head

ROOT = Path(__file__).parents[1]
PX = 64
N = 20  # images per class
COLD = "cold <b>&"  # a class name the HTML must escape
CLASSES = ("warm", COLD)
FLIPPED = [(0, 3), (1, 7)]  # (true class, index): saved under the other class
SCREENSHOT = "artifacts/audit-screenshot.png"


def _dataset(data: Path) -> None:
    for c in (0, 1):
        for i in range(N):
            given = CLASSES[1 - c if (c, i) in FLIPPED else c]
            save(photo(100 * c + i, c), data / "train" / given / f"c{c}_{i:02d}.png")
        for i in range(4):
            save(photo(5000 + 10 * c + i, c), data / "validation" / CLASSES[c] / f"v{i}.png")
    near = Image.fromarray(photo(5, 0))
    save(np.asarray(near), data / "train" / "warm" / "copy_c0_05.jpg", "JPEG")
    cropped = np.asarray(Image.fromarray(photo(111, 1)).crop((3, 3, PX - 3, PX - 3)))
    save(cropped, data / "validation" / COLD / "copy_c1_11.png")  # a leak
    save(other_kind(0), data / "train" / "warm" / "odd.png")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Features, two current runs (the better one audited) and the audit, made once."""
    root = tmp_path_factory.mktemp("report-audit")
    data, art = root / "data", root / "art"
    _dataset(data)
    spec = BackboneSpec(weights="none", input_size=PX, seed=0)
    extract(data, art, spec, log=lambda s: None)
    a = train_head(art, "logreg", folds=4, repeats=2, params={"C": "1"}, log=lambda s: None)
    b = train_head(art, "logreg", folds=4, repeats=2, params={"C": "0.01"}, log=lambda s: None)
    summary = auditing.run_audit(art, seed=0, log=lambda s: None)
    return {"root": root, "data": data, "art": art, "runs": [a, b], "summary": summary}


def _report(art: Path) -> tuple[dict, str, str, list[str]]:
    lines: list[str] = []
    rep = build_report(art, log=lines.append)
    folder = art / "report"
    return rep, (folder / "report.html").read_text(), (folder / "report.md").read_text(), lines


def _copy(audited, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(audited["art"], art)
    return art


def _section(html: str) -> str:
    m = re.search(r"<section id='audit'>.*?</section>", html, re.S)
    assert m, "no audit section"
    return m.group(0)


def test_the_section_names_the_audited_run_with_its_counts(audited, tmp_path):
    art = _copy(audited, tmp_path)
    rep, html, md, lines = _report(art)
    s = audited["summary"]
    li, nd, ol = s["label_issues"], s["near_duplicates"], s["outliers"]
    sec = _section(html)
    assert "Know your data" in sec
    assert f"Audit of run {s['run']} (current" in sec and "STALE" not in sec
    assert "id='audit-status' class='fresh'" in sec
    assert f"Likely label errors: {li['flagged']} of {li['scored']} scored" in sec
    assert li["scored"] == 2 * N + 2  # every training image
    assert f"Near-duplicate sets: {nd['sets']}</h3>" in sec and nd["sets"] >= 2
    assert f"<p>{nd['leaks']} cross training and validation" in sec and nd["leaks"] >= 1
    assert f"Outliers: {ol['count']} training images" in sec
    assert "train/warm/odd.png" in sec  # the image of another kind, first outlier
    # JSON and Markdown carry the same, without the pictures' bytes
    j = rep["audit"]
    assert j["run"] == s["run"] and j["current"] and j["label_issues"]["flagged"] == li["flagged"]
    assert "map_html" not in j and "thumbnail" not in json.dumps(j)
    on_disk = json.loads((art / "report/report.json").read_text())["audit"]
    assert on_disk["near_duplicates"]["leaks"] == nd["leaks"]
    assert "## Know your data" in md and f"Audit of run {s['run']} (current" in md
    assert not any("stale" in ln for ln in lines)


def test_label_errors_show_their_thumbnails_given_and_suggested_labels(audited, tmp_path):
    art = _copy(audited, tmp_path)
    _, html, _, _ = _report(art)
    sec = _section(html)
    figures = re.findall(r"<figure class='label-error'>(.*?)</figure>", sec, re.S)
    top = audited["summary"]["label_issues"]["top"]
    assert len(figures) == min(len(top), report_audit.LABEL_ERRORS) >= 2
    flipped = {f"train/{CLASSES[1 - c]}/c{c}_{i:02d}.png" for c, i in FLIPPED}
    shown = set()
    for fig in figures:
        m = re.search(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'>", fig)
        assert m, fig[:300]  # a thumbnail, embedded
        shown.add(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
        im = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
        assert im.size == (report_audit.THUMB, report_audit.THUMB)
        assert "&rarr; suggested" in fig
    assert flipped <= shown
    # every name escaped: the class name with markup never appears raw
    assert COLD not in html and "cold &lt;b&gt;&amp;" in sec
    # the most swapped pairs, as a table
    table = re.search(r"<table id='swapped'>.*?</table>", sec, re.S)
    assert table and "<td>warm</td><td>cold &lt;b&gt;&amp;</td>" in table.group(0)


def test_near_duplicate_sets_are_shown_side_by_side_leaks_first(audited, tmp_path):
    art = _copy(audited, tmp_path)
    _, html, _, _ = _report(art)
    sets = re.findall(r"<div class='dupset'>(.*?)</div></div>", _section(html), re.S)
    assert sets and "leak: training" in sets[0]  # the leak first
    assert all(len(re.findall(r"<figure class='near'><img ", s)) >= 2 for s in sets)
    leak = "validation/cold &lt;b&gt;&amp;/copy_c1_11.png"
    assert any(leak in s and "train/cold &lt;b&gt;&amp;/c1_11.png" in s for s in sets)


def test_calibration_of_every_current_run_and_a_reliability_diagram(audited, tmp_path):
    art = _copy(audited, tmp_path)
    rep, html, _, _ = _report(art)
    sec = _section(html)
    rows = rep["audit"]["calibration"]["runs"]
    assert {r["run"] for r in rows} == {r["run"] for r in audited["runs"]}
    for r in audited["runs"]:
        c = r["calibration"]
        row = f"<tr><td>{r['run']}</td><td>{c['ece']:.3f}</td><td>{c['brier']:.3f}</td>"
        assert row in sec
        assert f"<td>{c['temperature_fitted']:.2f}</td><td>{'yes' if c['applied'] else 'no'}" in sec
    png = art / "report" / "reliability.png"
    assert png.stat().st_size > 5_000 and "alt='reliability diagram of" in sec
    assert Image.open(png).size[0] >= 400


def test_the_map_is_embedded_as_made_and_a_tampered_one_is_not(audited, tmp_path):
    art = _copy(audited, tmp_path)
    _, html, _, _ = _report(art)
    fragment = audited["summary"]["map_html"]
    assert fragment.startswith('<figure class="cmap"') and fragment in _section(html)
    path = report_audit.audit_file(art)
    assert path == auditing.audit_dir(art) / "audit.json"
    audit = json.loads(path.read_text())
    audit["map_html"] = fragment.replace("<svg ", "<svg onload=\"alert('x')\" ", 1)
    path.write_text(json.dumps(audit))
    _, html, _, _ = _report(art)
    assert "alert(" not in html and "not one this pipeline draws" in _section(html)
    audit["map_html"] = fragment + "<script>alert(1)</script>"
    path.write_text(json.dumps(audit))
    _, html, _, _ = _report(art)
    assert "<script>alert" not in html


def _stale_by_files(art: Path, audited) -> str:
    path = report_audit.audit_file(art)
    audit = json.loads(path.read_text())
    audit["made_by"]["run_files"] = {k: "0" * 64 for k in audit["made_by"]["run_files"]}
    path.write_text(json.dumps(audit))
    return "was trained again since the audit"


def _stale_by_deleting(art: Path, audited) -> str:
    shutil.rmtree(art / "heads" / audited["summary"]["run"])
    return "is gone from the trained heads"


def _stale_by_new_features(art: Path, audited) -> str:
    """`make features` on the collection with one image more: every run and the audit stale."""
    data = art.parent / "data"
    shutil.copytree(audited["data"], data)
    save(photo(777, 0), data / "train" / "warm" / "new.png")
    extract(data, art, BackboneSpec(weights="none", input_size=PX, seed=0), log=lambda s: None)
    # a current run again, on the new cache, so the report ranks something
    train_head(art, "logreg", folds=4, repeats=2, params={"C": "1"}, log=lambda s: None)
    return "is stale: trained on other images"


@pytest.mark.parametrize("change", [_stale_by_files, _stale_by_deleting, _stale_by_new_features])
def test_an_audit_that_no_longer_describes_its_run_is_shown_stale(audited, tmp_path, change):
    art = _copy(audited, tmp_path)
    reason = change(art, audited)
    rep, html, md, lines = _report(art)
    sec = _section(html)
    run = audited["summary"]["run"]
    assert not rep["audit"]["current"] and reason in rep["audit"]["stale_reason"]
    assert f"STALE audit of run {run}" in sec and reason in sec
    assert "id='audit-status' class='banner'" in sec and "(current" not in sec
    assert f"**STALE audit of run {run}" in md
    assert any("stale" in ln and run in ln for ln in lines)
    # the calibration table lists the current runs only, never the stale or gone one
    current = {r["run"] for r in rep["results"]}
    assert {r["run"] for r in rep["audit"]["calibration"]["runs"]} == current


def test_a_run_trained_again_into_the_same_files_keeps_its_audit_current(audited, tmp_path):
    """The same settings on the same cache write the same bytes: the audit still describes it
    (a retrain that writes other bytes is the stale case by run_files above)."""
    art = _copy(audited, tmp_path)
    run = audited["summary"]["run"]
    before = json.loads((art / "heads" / run / "result.json").read_text())["files"]
    train_head(art, "logreg", folds=4, repeats=2, params={"C": "1"}, log=lambda s: None)
    after = json.loads((art / "heads" / run / "result.json").read_text())["files"]
    rep, html, _, _ = _report(art)
    assert rep["audit"]["current"] is (after == before)
    assert ("STALE" in _section(html)) is (after != before)


def test_no_audit_no_section(audited, tmp_path):
    art = _copy(audited, tmp_path)
    shutil.rmtree(auditing.audit_dir(art))
    rep, html, md, _ = _report(art)
    assert rep["audit"] is None and "id='audit'" not in html and "Know your data" not in md


def _need_chromium() -> None:
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed and REQUIRE_CHROMIUM is set (.ci/run)")
        pytest.skip("chromium is not installed (.ci/run installs it)")


def test_the_section_in_a_real_browser(audited, tmp_path):
    _need_chromium()
    art = _copy(audited, tmp_path)
    rep, _, _, _ = _report(art)
    got, stderr = open_in_chromium(art / "report/report.html", tmp_path)
    assert got["errors"] == [], got["errors"]
    assert "Uncaught" not in stderr
    assert got["imgs"] and all(i["ok"] and i["w"] > 0 for i in got["imgs"]), got["imgs"]
    a = rep["audit"]
    thumbs = (
        len(a["label_issues"]["shown"])
        + sum(len(s["members"]) for s in a["near_duplicates"]["shown"])
        + len(a["outliers"]["shown"])
    )
    assert sum(i["alt"].startswith("reliability diagram") for i in got["imgs"]) == 1
    assert sum(i["w"] == report_audit.THUMB for i in got["imgs"]) >= thumbs
    for section in ("audit", "label-errors", "near-duplicates", "outliers", "calibration", "map"):
        assert section in got["ids"], section
    assert any(i.startswith("cmap-") for i in got["ids"])  # the map's figure
    assert got["overflow"] <= 2, got["overflow"]  # readable at a phone's width
    assert "Know your data" in got["text"]


def _screenshot(page: Path, png: Path, tmp: Path, width: int = 1000, height: int = 3600) -> None:
    """A headless Chromium screenshot of the report's audit section alone."""
    only = page.parent / "audit-only.html"
    hide = "<style>body>*:not(#audit){display:none!important}</style>"
    only.write_text(page.read_text().replace("</head>", hide + "</head>", 1))
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'shot-profile'}", "--hide-scrollbars",
         f"--window-size={width},{height}", "--force-device-scale-factor=1",
         "--virtual-time-budget=10000", f"--screenshot={png}", only.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def test_a_screenshot_of_the_section(audited, tmp_path):
    """The README's picture: written to AUDIT_SCREENSHOT when set (a path), else checked only."""
    _need_chromium()
    art = _copy(audited, tmp_path)
    _report(art)
    raw = tmp_path / "shot.png"
    _screenshot(art / "report/report.html", raw, tmp_path)
    im = Image.open(raw).convert("RGB")
    pixels = np.asarray(im)
    drawn = np.flatnonzero((pixels < 240).any(axis=(1, 2)))
    assert im.size == (1000, 3600) and len(drawn)
    assert drawn[-1] < 3600 - 20  # the whole section, the map included, fits
    assert (pixels > 250).mean() > 0.3  # drawn, on white
    target = os.environ.get("AUDIT_SCREENSHOT")
    if target:
        im = im.crop((0, 0, im.size[0], int(drawn[-1]) + 16))
        small = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(target, format="PNG", optimize=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_the_readme_screenshot_is_kept_by_git():
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    p = subprocess.run(["git", "check-ignore", "-q", SCREENSHOT], cwd=ROOT, capture_output=True)
    assert p.returncode == 1, f"{SCREENSHOT} is ignored by git"
    shot = ROOT / SCREENSHOT
    assert 20_000 < shot.stat().st_size < 300_000
    assert Image.open(shot).size[0] == 1000

"""The collection's map: a seeded t-SNE layout, drawn as one self-contained SVG with hover."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from conftest import write_image
from PIL import Image
from test_report_browser import CHROMIUM, open_in_chromium

from pipeline import pictures
from pipeline.collection_map import MAX_THUMBS, PALETTE, embed_2d, render

EVIL = "<b>&"


def clusters(n: int, d: int = 16, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows around k centres in d dims, and each row's centre (its class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centres = rng.normal(0, 3, (k, d))
    return centres[labels] + rng.normal(0, 1, (n, d)), labels


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def picture(xy, labels, classes, marks=None, thumbs=None, titles=None, **kw) -> str:
    n = len(xy)
    return render(
        xy,
        labels,
        classes,
        marks if marks is not None else {},
        thumbs if thumbs is not None else [None] * n,
        titles if titles is not None else [f"img_{i}.png" for i in range(n)],
        **kw,
    )


def svg_of(page: str) -> str:
    """The plot itself, without the legend's swatches."""
    return re.search(r'<svg class="map".*?</svg>(?=<figcaption>)', page, re.S).group(0)


def test_same_seed_same_picture_another_seed_another(tmp_path):
    X, labels = clusters(80)
    xy, idx = embed_2d(X, seed=7, sample=60)
    again, idx2 = embed_2d(X.copy(), seed=7, sample=60)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    assert xy.tobytes() == again.tobytes() and np.array_equal(idx, idx2)  # bit for bit
    other, idx3 = embed_2d(X, seed=8, sample=60)  # another sample, so another layout
    assert not np.array_equal(idx, idx3) and not np.array_equal(xy, other)
    classes = ["a", "b", "c"]
    one = picture(xy, labels[idx], classes).encode()
    assert one == picture(again, labels[idx2], classes).encode()
    assert one != picture(other, labels[idx3], classes).encode()


def test_the_sample_bounds_the_points():
    X, labels = clusters(30)
    xy, idx = embed_2d(X, seed=0, sample=10)
    assert xy.shape == (10, 2) and len(idx) == 10
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 30  # sorted, distinct
    assert not np.array_equal(idx, embed_2d(X, seed=1, sample=10)[1])  # the sample is seeded
    page = picture(xy, labels[idx], ["a", "b", "c"])
    assert page.count('<g class="pt">') == 10


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_a_handful_of_rows_still_has_a_map(n):
    X, labels = clusters(n, d=5)
    xy, idx = embed_2d(X, seed=0)
    assert xy.shape == (n, 2) and np.isfinite(xy).all() and list(idx) == list(range(n))
    assert len({tuple(p) for p in xy}) == n  # distinct places
    assert picture(xy, labels, ["a", "b", "c"]).count('<g class="pt">') == n


def test_degenerate_features():
    xy, _ = embed_2d(np.ones((12, 5)), seed=0)  # one point repeated
    assert np.array_equal(xy, np.zeros((12, 2)))
    xy, _ = embed_2d(np.random.default_rng(0).normal(size=(12, 1)), seed=0)  # one feature
    assert xy.shape == (12, 2) and np.isfinite(xy).all()


def test_every_class_is_in_the_legend_escaped():
    classes = [f"class_{c}" for c in range(11)] + [EVIL]  # more than the palette holds
    labels = np.arange(len(classes)).repeat(2)
    xy = np.random.default_rng(0).normal(size=(len(labels), 2))
    page = picture(xy, labels, classes)
    legend = re.findall(r'<li class="cls">.*?</li>', page)
    assert len(legend) == len(classes)
    for name, item in zip(classes[:-1], legend, strict=False):
        assert f"{name} (2)" in item
    assert "&lt;b&gt;&amp; (2)" in legend[-1]
    assert EVIL not in page
    plot = svg_of(page)
    assert plot.count(f'fill="{PALETTE[0]}"') == 2  # class 0, solid
    assert plot.count(f'stroke="{PALETTE[0]}"') == 2  # class 10: the same colour, a ring


def test_marks_are_drawn_distinctly_and_listed():
    n = 40
    rng = np.random.default_rng(3)
    xy, labels = rng.normal(size=(n, 2)), rng.integers(0, 3, n)
    error = np.zeros(n, bool)
    error[[1, 5, 9]] = True
    outlier = np.zeros(n, bool)
    outlier[[5, 20]] = True
    marks = {"likely label error": error, "outlier": outlier}
    page = picture(xy, labels, ["a", "b", "c"], marks)
    plot = svg_of(page)
    assert plot.count('class="mk mk0"') == 3 and plot.count('class="mk mk1"') == 2
    assert plot.count("<circle") - plot.count('class="mk mk0"') == n  # one dot per point
    assert re.search(r'<rect class="mk mk1"', plot)  # another shape for the second mark
    assert re.search(r'<li class="mark">.*?likely label error \(3\)</li>', page)
    assert re.search(r'<li class="mark">.*?outlier \(2\)</li>', page)
    last = plot.rsplit('<g class="pt">', 4)[1:]  # the marked points are drawn last, on top
    assert all('class="mk' in g for g in last)
    with pytest.raises(ValueError, match="outlier"):
        picture(xy, labels, ["a", "b", "c"], {"outlier": outlier[:-1]})


def test_text_is_escaped():
    titles = ["<script>alert(1)</script>\ngiven: <b>&\nsuggested: a", "x&y.png"]
    page = picture(np.eye(2), np.array([0, 1]), ["a", EVIL], thumbs=[jpeg(0), None], titles=titles)
    assert "<script>" not in page and EVIL not in page and "x&y" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "x&amp;y.png" in page
    assert "given: &lt;b&gt;&amp;" in page


def test_thumbnails_are_bounded_marked_first(tmp_path):
    n = 50
    rng = np.random.default_rng(1)
    xy, labels = rng.normal(size=(n, 2)), rng.integers(0, 2, n)
    thumbs: list[bytes | None] = [jpeg(i) for i in range(n)]
    thumbs[7] = None  # unreadable: a title only
    outlier = np.zeros(n, bool)
    outlier[[3, 7, 44]] = True
    titles = [f"t{i:02d}" for i in range(n)]
    page = picture(xy, labels, ["a", "b"], {"outlier": outlier}, thumbs, titles, max_thumbs=10)
    shown = re.findall(r'<title>(t\d\d)</title>(?:(?!<g class="pt">).)*?<image', page)
    assert len(shown) == 10 == page.count("<image")
    assert {"t03", "t44"} <= set(shown) and "t07" not in shown
    assert page.count("data:image/jpeg;base64,") == 10
    assert "10 of 50 points show a thumbnail" in page
    again = picture(xy, labels, ["a", "b"], {"outlier": outlier}, thumbs, titles, max_thumbs=10)
    assert again == page  # the sample is seeded
    assert MAX_THUMBS == 2000
    room = sum(len(thumbs[i]) for i in (3, 44))  # a byte budget: the two marked ones fit
    page = picture(
        xy, labels, ["a", "b"], {"outlier": outlier}, thumbs, titles, max_thumb_bytes=room
    )
    assert page.count("<image") == 2 and "2 of 50 points" in page


def test_thumbnails_decode_in_a_real_browser(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_CHROMIUM"):  # CI: a missing browser fails, never skips
            pytest.fail("chromium is not installed and REQUIRE_CHROMIUM is set (.ci/run)")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    n = 24
    X, labels = clusters(n)
    xy, idx = embed_2d(X, seed=0)
    thumbs: list[bytes | None] = []
    for i in range(n):  # PNGs through the report's own thumbnailer, and JPEGs
        if i % 3 == 0:
            thumbs.append(jpeg(i))
        else:
            thumbs.append(pictures.thumbnail(write_image(tmp_path / f"img{i}.png", i % 3, i), 32))
    thumbs[5] = None
    marks = {"likely label error": np.arange(n) % 7 == 0, "outlier": np.arange(n) == 4}
    titles = [f"img{i}.png\ngiven: {EVIL}" for i in range(n)]
    fragment = picture(xy, labels[idx], ["a", "b", EVIL], marks, thumbs, titles)
    # every thumbnail the SVG embeds, loaded again as an <img> (document.images, which the
    # probe reports with its natural width once the page has loaded)
    copy = """<script>document.querySelectorAll('svg.map image').forEach((im, i) => {
      const img = document.createElement('img'); img.alt = 'thumb ' + i;
      img.src = im.getAttribute('href'); document.body.appendChild(img); });</script>"""
    page = tmp_path / "map.html"
    page.write_text(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1"><title>map</title>'
        f"</head><body>{fragment}{copy}</body></html>"
    )
    got, stderr = open_in_chromium(page, tmp_path)
    assert got["errors"] == [], got["errors"]
    assert "Uncaught" not in stderr
    assert len(got["imgs"]) == n - 1  # all but the missing one
    assert all(i["ok"] and i["w"] > 0 for i in got["imgs"]), got["imgs"]
    assert got["overflow"] <= 2, got["overflow"]  # readable at a phone's width
    for needle in ("a (", "b (", f"{EVIL} (", "likely label error (", "outlier (1)"):
        assert needle in got["text"], needle

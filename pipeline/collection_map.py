"""A map of the collection for the HTML report: every image as a point, similar images close.

`embed_2d` lays the features out in two dimensions (L2-normalised, PCA to at most 50 dims,
then t-SNE) on a seeded sample of the rows, the same picture for the same seed bit for bit.
`render` draws the layout as one self-contained inline SVG in a small <figure>: a point per
image coloured by its class, the marked ones (likely label errors, outliers, ...) outlined
in a shape of their own, and on hover the image's thumbnail and title in a side panel (CSS
only, no script, no external resource).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math

import numpy as np

# t-SNE (Barnes-Hut, 1,000 iterations) measured on this project's 2-core machine while it
# was shared (load 9 to 12), 512-dim rows in 10 clusters, one thread: 2,000 rows 22-37 s,
# 5,000 rows 69-115 s (PCA included). It grows a little faster than the rows, so 20,000 would
# take 5 minutes and more; 5,000 keeps the map near 2 minutes at worst and still shows the
# collection's shape (its clusters, its outliers).
SAMPLE = 5_000
MAX_THUMBS = 2_000  # thumbnails embedded at most, and their bytes at most: the page stays
MAX_THUMB_BYTES = 8_000_000  # under ~11 MB (base64) whatever the thumbnails' size

# Tableau 10: a qualitative palette readable on white. Classes beyond its length reuse the
# colours in another style (ring, then dashed ring); past 30 the styles repeat too, and the
# legend and each point's title still name the class.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
STYLES = ("solid", "ring", "dashed ring")
MARK_SHAPES = ("circle", "square", "diamond", "triangle", "cross")

PLOT = 600.0  # the plot's side, in SVG units; the hover panel is to its right
PANEL = 200.0
PAD = 12.0
R = 3.0  # a point's radius


def embed_2d(X: np.ndarray, seed: int, sample: int = SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of a seeded sample of at most `sample` rows of `X`, and those rows'
    indices (sorted). Deterministic: one thread (OpenMP's reductions add in any order with
    more), PCA by full SVD, t-SNE seeded; the cost is bounded by `sample`, not by `X`.
    The seed picks the sample; t-SNE's PCA initialisation and Barnes-Hut gradient leave it
    nothing random to choose, so below `sample` rows every seed gives the same layout."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if not hasattr(X, "shape"):  # a list; an array or a file (the audit's space) is only
        X = np.asarray(X, dtype=np.float64)  # read at the sampled rows
    if len(X.shape) != 2:
        raise ValueError(f"X must be 2-D (rows, features), got shape {X.shape}")
    if sample < 1:
        raise ValueError(f"sample must be at least 1, got {sample}")
    n_all = len(X)
    if n_all > sample:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n_all, size=sample, replace=False))
    else:
        idx = np.arange(n_all)
    n = len(idx)
    if n <= 3:  # too few for t-SNE's perplexity: corners of a triangle, in row order
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
        return corners[:n].copy(), idx
    rows = np.asarray(X[idx], dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms > 0, norms, 1.0)  # an all-zero row stays at the origin
    if not np.any(rows != rows[0]):  # one point repeated: nothing to lay out
        return np.zeros((n, 2)), idx
    with threadpool_limits(limits=1):
        k = min(50, X.shape[1], n - 1)
        Z = PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(rows)
        if Z.shape[1] < 2:  # t-SNE's PCA initialisation needs two columns
            Z = np.hstack([Z, np.zeros((n, 2 - Z.shape[1]))])
        tsne = TSNE(
            n_components=2,
            init="pca",
            random_state=seed,
            perplexity=min(30.0, (n - 1) / 3),
            n_jobs=1,
        )
        xy = tsne.fit_transform(Z)
    return np.asarray(xy, dtype=np.float64), idx


def _thumb_rows(
    thumbs: list[bytes | None], marked: np.ndarray, limit: int, budget: int, seed: int
) -> set[int]:
    """Rows that get a thumbnail: the marked ones first, then the rest, each group in a seeded
    random order, until `limit` thumbnails or `budget` bytes of them."""
    rng = np.random.default_rng(seed)
    has = np.array([t is not None for t in thumbs], dtype=bool)
    chosen: set[int] = set()
    spent = 0
    for group in (np.flatnonzero(has & marked), np.flatnonzero(has & ~marked)):
        for i in rng.permutation(group):
            size = len(thumbs[i] or b"")
            if len(chosen) >= limit or spent + size > budget:
                return chosen
            chosen.add(int(i))
            spent += size
    return chosen


def _sniff(data: bytes) -> str:
    """The image's MIME type from its first bytes (PNG or JPEG; PNG otherwise)."""
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"


def _class_shape(c: int, x: float, y: float, r: float = R, kind: str = "p") -> str:
    """The point of class c: its palette colour, in the style of its round through the palette."""
    colour = PALETTE[c % len(PALETTE)]
    style = STYLES[(c // len(PALETTE)) % len(STYLES)]
    if style == "solid":
        look = f'fill="{colour}"'
    elif style == "ring":
        look = f'fill="#fff" stroke="{colour}" stroke-width="1.6"'
    else:
        look = f'fill="#fff" stroke="{colour}" stroke-width="1.6" stroke-dasharray="1.5 1"'
    return f'<circle class="{kind}" cx="{x:.1f}" cy="{y:.1f}" r="{r:g}" {look}/>'


def _mark_shape(j: int, x: float, y: float, s: float = R + 3, kind: str = "mk") -> str:
    """The outline of the j-th mark around a point; past the shapes' length they repeat dashed."""
    shape = MARK_SHAPES[j % len(MARK_SHAPES)]
    dash = ' stroke-dasharray="2 1.5"' if j >= len(MARK_SHAPES) else ""
    look = f'class="{kind} {kind}{j}" fill="none" stroke="#222" stroke-width="1.3"{dash}'
    if shape == "circle":
        return f'<circle {look} cx="{x:.1f}" cy="{y:.1f}" r="{s:g}"/>'
    if shape == "square":
        w = 2 * s
        return f'<rect {look} x="{x - s:.1f}" y="{y - s:.1f}" width="{w:g}" height="{w:g}"/>'
    if shape == "diamond":
        pts = f"{x:.1f},{y - s:.1f} {x + s:.1f},{y:.1f} {x:.1f},{y + s:.1f} {x - s:.1f},{y:.1f}"
        return f'<polygon {look} points="{pts}"/>'
    if shape == "triangle":
        pts = f"{x:.1f},{y - s:.1f} {x + s:.1f},{y + s * 0.8:.1f} {x - s:.1f},{y + s * 0.8:.1f}"
        return f'<polygon {look} points="{pts}"/>'
    a, b, c, e = x - s, x + s, y - s, y + s
    d = f"M{a:.1f},{c:.1f}L{b:.1f},{e:.1f}M{a:.1f},{e:.1f}L{b:.1f},{c:.1f}"
    return f'<path {look} d="{d}"/>'


def _swatch(inner: str) -> str:
    return f'<svg width="16" height="16" viewBox="0 0 16 16" aria-hidden="true">{inner}</svg>'


def _panel_text(title: str, x: float, y: float) -> str:
    """The title's lines under the thumbnail, each cut to fit the panel (the full title is the
    point's tooltip)."""
    lines = title.splitlines()[:6] or [""]
    out = []
    for k, line in enumerate(lines):
        cut = line if len(line) <= 30 else "…" + line[-29:]
        out.append(f'<tspan x="{x:.1f}" y="{y + 14 * k:.1f}">{html.escape(cut)}</tspan>')
    return f'<text font-size="11" fill="#222">{"".join(out)}</text>'


CSS = """.cmap{margin:1em 0;max-width:820px}.cmap svg.map{width:100%;height:auto;display:block}
.cmap .hv{display:none}.cmap .pt:hover .hv{display:inline}.cmap .pt:hover .p{stroke:#000}
.cmap ul{list-style:none;padding:0;margin:.4em 0;display:flex;flex-wrap:wrap;gap:.2em 1em}
.cmap li{display:flex;align-items:center;gap:.3em;font-size:.9em;overflow-wrap:anywhere}"""


def render(
    xy: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    marks: dict[str, np.ndarray],
    thumbs: list[bytes | None],
    titles: list[str],
    *,
    max_thumbs: int = MAX_THUMBS,
    max_thumb_bytes: int = MAX_THUMB_BYTES,
    seed: int = 0,
) -> str:
    """The map as an HTML fragment: a <figure> holding one inline SVG and its legend.

    Point i sits at xy[i], coloured by classes[labels[i]]; a point with marks[name][i] set is
    outlined in that mark's shape (marked points are drawn last, on top). Hovering a point shows
    its thumbnail (PNG or JPEG bytes, as a data: URI) and title in the panel beside the plot;
    to bound the page, at most `max_thumbs` points embed one, `max_thumb_bytes` bytes of images
    in all (the marked ones first, then a sample seeded by `seed`); the others show their title
    only. All text is HTML-escaped.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    n = len(xy)
    if not (len(labels) == len(thumbs) == len(titles) == n):
        raise ValueError("xy, labels, thumbs and titles must have one entry per point")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must index classes (0..{len(classes) - 1})")
    flags = {}
    for name, m in marks.items():
        m = np.asarray(m, dtype=bool)
        if m.shape != (n,):
            raise ValueError(f"marks[{name!r}] must be a boolean array of {n} entries")
        flags[name] = m
    marked = np.zeros(n, dtype=bool)
    for m in flags.values():
        marked |= m
    with_thumb = _thumb_rows(thumbs, marked, max_thumbs, max_thumb_bytes, seed)

    if n:
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        scale = (PLOT - 2 * PAD) / max(float((hi - lo).max()), 1e-12)
        centre = (PLOT - scale * (hi - lo)) / 2  # keeps the aspect ratio; centres the layout
        pos = centre + (xy - lo) * scale
    else:
        pos = xy
    px, py = PLOT + PAD, PAD  # the hover panel's corner
    side = PANEL - 2 * PAD

    points = []
    for i in [*np.flatnonzero(~marked), *np.flatnonzero(marked)]:  # marked on top
        x, y = float(pos[i, 0]), float(pos[i, 1])
        parts = [f'<g class="pt"><title>{html.escape(titles[i])}</title>']
        parts.append(_class_shape(int(labels[i]), x, y))
        for j, m in enumerate(flags.values()):
            if m[i]:
                parts.append(_mark_shape(j, x, y))
        if i in with_thumb:
            data = thumbs[i]
            assert data is not None
            uri = f"data:{_sniff(data)};base64,{base64.b64encode(data).decode('ascii')}"
            parts.append(
                f'<g class="hv"><image class="th" x="{px:g}" y="{py:g}" width="{side:g}" '
                f'height="{side:g}" href="{uri}" preserveAspectRatio="xMidYMin meet"/>'
                f"{_panel_text(titles[i], px, py + side + 16)}</g>"
            )
        else:
            parts.append(f'<g class="hv">{_panel_text(titles[i], px, py + 14)}</g>')
        parts.append("</g>")
        points.append("".join(parts))

    counts = np.bincount(labels, minlength=len(classes)) if n else np.zeros(len(classes), int)
    legend = [
        f'<li class="cls">{_swatch(_class_shape(c, 8, 8, 5, "sw"))}{html.escape(name)} '
        f"({int(counts[c])})</li>"
        for c, name in enumerate(classes)
    ]
    legend += [
        f'<li class="mark">{_swatch(_mark_shape(j, 8, 8, 6, "sw"))}{html.escape(name)} '
        f"({int(m.sum())})</li>"
        for j, (name, m) in enumerate(flags.items())
    ]
    width = PLOT + PANEL
    svg = (
        f'<svg class="map" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:g} {PLOT:g}" '
        f'role="img" aria-label="map of the collection: {n} images">'
        f'<rect width="{PLOT:g}" height="{PLOT:g}" fill="#fafafa" stroke="#ddd"/>'
        f'<text x="{px:g}" y="{PLOT - PAD:g}" font-size="11" fill="#777">hover a point</text>'
        f"{''.join(points)}</svg>"
    )
    thumbs_note = (
        f"{len(with_thumb)} of {n} points show a thumbnail on hover"
        if len(with_thumb) < n
        else "every point shows its thumbnail on hover"
    )
    caption = (
        f"<figcaption>Map of the collection (t-SNE of the features): {n} images, similar "
        f"ones close together; {thumbs_note}.<ul>{''.join(legend)}</ul></figcaption>"
    )
    digest = hashlib.sha256(svg.encode()).hexdigest()[:12]
    return f'<figure class="cmap" id="cmap-{digest}"><style>{CSS}</style>{svg}{caption}</figure>'

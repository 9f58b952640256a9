"""The report's "Know your data" section, from the audit `make audit` wrote (audit/audit.json).

Which run it audits and whether it still describes it: the audit is *stale* (shown apart with
the reason, never as current) when its run is gone or stale, the run's saved files differ from
those it audited (trained again since), the run's cache is not the one audited, or the latest
`make features` holds other images, labels or splits. Then: likely label errors with their
thumbnails and the most swapped class pairs, near-duplicate sets (leaks across training and
validation and sets whose labels disagree first) side by side, outliers, the calibration of
every current run with a reliability diagram of the audited one, and the map of the
collection (audit.json's fragment, made by `collection_map.render`, embedded as it is).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from markupsafe import Markup

from pipeline import pictures

Log = Callable[[str], None]
LABEL_ERRORS = 24  # shown with a thumbnail each (audit/label_issues.csv holds every one)
PAIRS = 10  # most swapped (given, suggested) class pairs
SETS = 12  # near-duplicate sets shown
MEMBERS = 6  # images shown per set
OUTLIERS = 12
THUMB = 96  # pixels, as the mistakes' gallery

# what `collection_map.render` writes: these elements, no event handler, images as data: URIs
_MAP_TAGS = {"figure", "style", "svg", "rect", "text", "g", "title", "circle", "image", "tspan",
             "polygon", "path", "figcaption", "ul", "li"}  # fmt: skip


def audit_file(artifacts: Path) -> Path:
    """audit.json (in `auditing.audit_dir`, not imported: it brings the training code)."""
    return Path(artifacts) / "audit" / "audit.json"


def freshness(
    audit: dict[str, Any], all_runs: list[dict[str, Any]], current: dict[str, Any] | None
) -> tuple[bool, str]:
    """(current?, why not): whether the audit still describes its run and the current data.

    Stale when: no record of what made it; its run is gone, or stale itself (`runs.status`);
    the run's saved files are not those audited (trained again into other bytes); the run's
    cache (key, content) is not the one audited; the latest `make features` holds other images,
    labels or splits (`current`'s data_id). The cache key is the run's, not the latest cache's:
    a run on an earlier cache of the same images (another backbone) is current, its audit too.
    """
    made = audit.get("made_by") or {}
    name = made.get("run")
    if not name:
        return False, "made by an older version of `make audit` (no record of what made it)"
    r = next((r for r in all_runs if r["run"] == name), None)
    if r is None:
        return False, f"its run '{name}' is gone from the trained heads"
    if not r["current"]:
        return False, f"its run '{name}' is stale: {r['stale_reason']}"
    if r.get("files") != made.get("run_files"):
        return False, f"run '{name}' was trained again since the audit (its saved files differ)"
    feats = r.get("features") or {}
    audited = (made.get("cache_key"), made.get("data_id"))
    if audited != (feats.get("cache_key"), feats.get("data_id")):
        return False, f"run '{name}' was trained on another feature cache than the one audited"
    if current is None or made.get("data_id") != current.get("data_id"):
        return False, "the latest `make features` holds other images, labels or splits"
    return True, ""


def section(
    artifacts: Path,
    all_runs: list[dict[str, Any]],
    current: dict[str, Any] | None,
    out: Path,
    log: Log = print,
) -> dict[str, Any] | None:
    """The section's content (thumbnails as PNG bytes, the map as trusted markup), or None
    without an audit. Writes `out`/reliability.png for the audited run's calibration."""
    path = audit_file(artifacts)
    if not path.is_file():
        return None
    try:
        audit = json.loads(path.read_text(encoding="utf-8"))
        return _section(audit, all_runs, current, out, log)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"warning: '{path}' is unreadable ({type(e).__name__}: {e}); rerun `make audit`")
        return None


def _section(
    audit: dict[str, Any],
    all_runs: list[dict[str, Any]],
    current: dict[str, Any] | None,
    out: Path,
    log: Log,
) -> dict[str, Any]:
    fresh, reason = freshness(audit, all_runs, current)
    if not fresh:
        log(f"warning: the audit of '{audit.get('run')}' is stale ({reason}); rerun `make audit`")
    root = (current or {}).get("data_root")
    thumbs: dict[str, bytes | None] = {}

    def thumb(p: str) -> bytes | None:
        if p not in thumbs:
            ok = root and p and not Path(p).is_absolute() and ".." not in Path(p).parts
            thumbs[p] = pictures.thumbnail(Path(root) / p, THUMB) if ok else None
        return thumbs[p]

    made, classes = audit.get("made_by") or {}, audit["classes"]
    li, nd, ol = audit["label_issues"], audit["near_duplicates"], audit["outliers"]
    pairs = [
        {"given": classes[i], "suggested": classes[j], "images": int(n)}
        for i, row in enumerate(li["swapped_pairs"])
        for j, n in enumerate(row)
        if n and i != j
    ]
    pairs.sort(key=lambda p: -p["images"])
    sets = [
        {**s, "members": [{**m, "thumbnail": thumb(m["path"])} for m in s["members"][:MEMBERS]],
         "size": len(s["members"])}
        for s in nd["top"][:SETS]
    ]  # fmt: skip
    calib = dict(audit.get("calibration") or {})
    run = next((r for r in all_runs if r["run"] == audit["run"]), None)
    if fresh and run and "reliability_scaled" not in calib:  # the same run: its own record
        calib["reliability_scaled"] = (run.get("calibration") or {}).get("reliability_scaled")
    png = None
    if calib.get("reliability"):
        png = "reliability.png"
        title = f"reliability of {audit['run']} (out of fold)"
        pictures.reliability(
            calib["reliability"], title, out / png, calib.get("reliability_scaled")
        )
    return {
        "run": audit["run"],
        "current": fresh,
        "stale_reason": reason,
        "audited_utc": (made.get("environment") or {}).get("created_utc"),
        "seed": made.get("seed"),
        "k": made.get("k"),
        "label_issues": {
            **{k: li[k] for k in ("method", "partitions", "scored", "flagged")},
            "shown": [{**it, "thumbnail": thumb(it["path"])} for it in li["top"][:LABEL_ERRORS]],
            "pairs": pairs[:PAIRS],
        },
        "near_duplicates": {
            **{k: nd[k] for k in ("sets", "leaks", "labels_disagree", "ratio", "search")},
            "shown": sets,
        },
        "outliers": {
            **{k: ol[k] for k in ("count", "threshold", "quantile")},
            "shown": [{**it, "thumbnail": thumb(it["path"])} for it in ol["top"][:OUTLIERS]],
        },
        "calibration": {
            "audited": {**calib, "png": png},
            "runs": [_calibration_row(r) for r in all_runs if r["current"]],
        },
        "map": {**(audit.get("map") or {}), "file": "../audit/map.html"},
        "map_html": _trusted_map(audit.get("map_html") or ""),
    }


def _calibration_row(r: dict[str, Any]) -> dict[str, Any]:
    c = r.get("calibration") or {}
    keys = ("ece", "brier", "temperature", "temperature_fitted", "ece_scaled", "applied")
    return {"run": r["run"], **{k: c.get(k) for k in keys}, "confidence": c.get("confidence")}


def _trusted_map(fragment: str) -> Markup | None:
    """The map fragment as markup to embed unescaped, deliberately: `collection_map.render`
    escapes every text it writes. Checked to be what it makes (its elements, no handler, images
    as data: URIs only) so an audit.json edited by hand cannot put a script in the report."""
    if not fragment.startswith('<figure class="cmap"'):
        return None
    for tag in re.finditer(r"<(/?)([a-zA-Z][\w:-]*)([^>]*)>", fragment):
        name, attrs = tag.group(2).lower(), tag.group(3)
        if name not in _MAP_TAGS or re.search(r"\son\w*\s*=", attrs, re.I):
            return None
        if re.search(r"href\s*=", attrs) and not re.search(r'href="data:image/(png|jpeg);', attrs):
            return None
    return Markup(fragment)  # noqa: S704 - checked above; made by our escaping renderer


def as_json(sec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The section for report.json: no thumbnail bytes, the map by its file."""
    if sec is None:
        return None

    def bare(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in it.items() if k != "thumbnail"} for it in items]

    nd = sec["near_duplicates"]
    return {
        **{k: v for k, v in sec.items() if k != "map_html"},
        "label_issues": {**sec["label_issues"], "shown": bare(sec["label_issues"]["shown"])},
        "near_duplicates": {
            **nd,
            "shown": [{**s, "members": bare(s["members"])} for s in nd["shown"]],
        },
        "outliers": {**sec["outliers"], "shown": bare(sec["outliers"]["shown"])},
    }


def num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def status(sec: dict[str, Any]) -> str:
    """One line: which run the audit is of, and whether it is current."""
    when = f", audited {sec['audited_utc']}" if sec.get("audited_utc") else ""
    if sec["current"]:
        return f"Audit of run {sec['run']} (current{when})."
    return (
        f"STALE audit of run {sec['run']}{when}: {sec['stale_reason']}. What follows describes "
        "the data as it was then; rerun `make audit`."
    )


def markdown(sec: dict[str, Any] | None) -> list[str]:
    """The section as Markdown lines (paths and counts; the thumbnails are in the HTML)."""
    if sec is None:
        return []
    li, nd, ol = sec["label_issues"], sec["near_duplicates"], sec["outliers"]
    lines = ["", "## Know your data", "", f"**{status(sec)}**", ""]
    lines += [
        f"### Likely label errors: {li['flagged']} of {li['scored']} scored images",
        "",
        *[f"- `{it['path']}`: given {it['given']}, suggested {it['suggested']} "
          f"(score {num(it['score'])})" for it in li["shown"]],
        "",
        *[f"- {p['given']} -> {p['suggested']}: {p['images']}" for p in li["pairs"]],
        "",
        f"### Near-duplicate sets: {nd['sets']} ({nd['leaks']} cross training and validation, "
        f"{nd['labels_disagree']} disagree on the label)",
        "",
        *["- " + " ~ ".join(f"`{m['path']}` ({m['label']}, {m['split']})" for m in s["members"])
          for s in nd["shown"]],
        "",
        f"### Outliers: {ol['count']} above the {ol['quantile']:.0%} quantile",
        "",
        *[f"- `{it['path']}` ({it['label']}): {num(it['distance'])}" for it in ol["shown"]],
        "",
        "### Calibration",
        "",
        "| run | ECE | Brier | fitted temperature | predict applies it "
        "| ECE after (cross-fitted) |",
        "|---|---|---|---|---|---|",
        *[f"| {c['run']} | {num(c['ece'])} | {num(c['brier'])} | "
          f"{num(c['temperature_fitted'], '.2f')} | {_yes(c['applied'])} | "
          f"{num(c['ece_scaled'])} |" for c in sec["calibration"]["runs"]],
    ]  # fmt: skip
    if sec["calibration"]["audited"].get("png"):
        lines += ["", f"![reliability diagram]({sec['calibration']['audited']['png']})"]
    return lines + ["", f"Map of the collection: {sec['map']['file']}"]


def _yes(v: bool | None) -> str:
    return "n/a" if v is None else "yes" if v else "no"

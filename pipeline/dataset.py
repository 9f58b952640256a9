"""Dataset scanning: class folders to (path, class, split); images are recognised later, by content.

Layouts: `DATA/train/<class>/...` with optional `DATA/validation/<class>/...` (classic), a flat
`DATA/<class>/...`, or a CSV file `path,label[,split]` (paths relative to its folder; layout
"csv"). Class names are the sorted folder names (a CSV's: its sorted distinct labels). Files in
nested folders belong to their class folder. Hidden files and OS junk are ignored. One scan
enters each folder once: a link to a folder already walked, to another class's folder or to a
folder above them is not followed (a warning names it), so no image is embedded twice or under
another class's label.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.listing import SPLITS, Builder, Item, Listing

JUNK_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
JUNK_DIRS = {"__macosx", "@eadir", "$recycle.bin", "lost+found"}


@dataclass
class Scan:
    """What a scan found: the class names, every candidate file (as columns: `Listing`, a
    sequence of `Item`s made when asked) and the warnings to show."""

    root: Path
    layout: str
    classes: list[str]
    items: Listing
    warnings: list[str] = field(default_factory=list)
    source: Path | None = None  # what DATA named, when not `root` itself (a CSV file)
    source_sha256: str = ""  # what that CSV says (`csv_digest`), read once by the scan
    source_stat: tuple[int, int] = (0, 0)  # its size and mtime_ns when read

    def count(self, split: str) -> int:
        return self.items.count(split)


def source_attrs(scan: Scan) -> dict[str, str]:
    """What DATA was, recorded in the cache: layout, path, root of the paths, a CSV's SHA-256."""
    source = Path(scan.source or scan.root)
    return {
        "layout": scan.layout,
        "data": str(source.resolve()),
        "data_root": str(Path(scan.root).resolve()),
        "data_sha256": scan.source_sha256,
        "data_stat": list(scan.source_stat),
    }


def csv_digest(rows: list[tuple[int, str, str, str]]) -> str:
    """SHA-256 of what a labels CSV says (its rows as a set): reordering rows changes nothing."""
    said = sorted({(p, lab, sp.lower() or "train") for _, p, lab, sp in rows})
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()


def same_source(attrs: dict[str, object], scan: Scan) -> bool:
    """Whether a cache's record of DATA still holds for `scan` (a CSV's touch alone: yes)."""
    now = source_attrs(scan)
    return all(attrs.get(k) == now[k] for k in ("layout", "data", "data_root", "data_sha256"))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def source_changed(attrs: dict[str, object]) -> str:
    """Why the labels a cache was made from differ from DATA's now (a CSV edited since), or ""."""
    sha = attrs.get("data_sha256")
    if attrs.get("layout") != "csv" or not sha:
        return ""
    csv_file = Path(str(attrs.get("data")))
    if not csv_file.is_file():
        return ""  # moved or gone: the cache still holds the labels it was made with
    if _stat(csv_file) == tuple(int(v) for v in attrs.get("data_stat") or ()):
        return ""  # untouched since: not read again (a CSV may list millions of images)
    try:
        now = csv_digest(_read_csv(csv_file))
    except UserError as e:
        return f"{e} (the cache holds the labels it had when `make features` last read it)"
    if now == sha:
        return ""
    return (
        f"'{display(str(csv_file))}' changed since `make features` read it; the cache still "
        f"holds its old labels: run `make features DATA={display(str(csv_file))}` again"
    )


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_FILES


def _class_dirs(folder: Path) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_dir() and not _ignored(e.name) and e.name.lower() not in JUNK_DIRS
    )


def display(path: str) -> str:
    """A path as valid UTF-8 for the cache and the report (undecodable bytes shown escaped)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


Key = tuple[int, int]  # (st_dev, st_ino): one folder, whatever path or link reaches it


def _key(path: str | os.PathLike[str]) -> Key | None:
    """The identity of the folder at `path` (links followed), or None if it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _ancestors(path: Path, what: str) -> dict[Key, str]:
    """Every folder above `path`, by its written and its real location, described for warnings.

    Entering one of them through a link would walk `path` (and its neighbours) a second time.
    """
    out: dict[Key, str] = {}
    for base in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for parent in base.parents:
            key = _key(parent)
            if key is not None:
                out.setdefault(key, f"'{display(str(parent))}', which contains {what}")
    return out


def walk_files(
    top: Path,
    warnings: list[str] | None = None,
    *,
    seen: set[Key] | None = None,
    fence: dict[Key, str] | None = None,
) -> list[Path]:
    """Non-hidden files under `top`, following directory symlinks, never entering a folder twice.

    (`walk_folders` streams them a folder at a time.)

    `seen` holds the folders already walked; share one set to walk several tops as one scan.
    `fence` maps folders never to enter to a description (other class folders, the folders
    above them); the folders above `top` are always fenced. Each link refused for either reason,
    and each folder that cannot be read, is reported in `warnings`, never silently dropped.
    """
    return [
        Path(d) / f
        for d, names in walk_folders(top, warnings, seen=seen, fence=fence)
        for f in names
    ]


def walk_folders(
    top: Path,
    warnings: list[str] | None = None,
    *,
    seen: set[Key] | None = None,
    fence: dict[Key, str] | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """`walk_files`, a folder at a time: each folder walked and its non-hidden file names."""
    seen = set() if seen is None else seen
    fence = {**_ancestors(top, f"'{display(str(top))}'"), **(fence or {})}

    def warn(msg: str) -> None:
        if warnings is not None:
            warnings.append(msg)

    def onerror(e: OSError) -> None:
        warn(f"cannot read folder '{e.filename}' ({e.strerror}); its files are left out")

    top_key = _key(top)
    if top_key in seen:
        warn(f"folder '{display(str(top))}' is reached again through a link; walked once")
        return
    if top_key is not None:
        seen.add(top_key)
    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if _ignored(d) or d.lower() in JUNK_DIRS:
                continue
            sub = os.path.join(dirpath, d)
            key = _key(sub)  # claimed when listed, so a sibling link to it is the one refused
            if key in seen:
                warn(f"folder '{display(sub)}' is reached again through a link; walked once")
            elif key in fence:
                warn(
                    f"folder '{display(sub)}' links to {fence[key]}; not entered, so no file "
                    "is walked twice"
                )
            else:
                if key is not None:
                    seen.add(key)
                keep.append(d)
        dirnames[:] = keep
        names = [f for f in sorted(filenames) if not _ignored(f)]
        if names:
            yield dirpath, names


def scan(root: str | os.PathLike[str]) -> Scan:
    """Find the layout, the classes and every candidate file under `root` (or in a CSV file)."""
    root = Path(root)
    if root.suffix.lower() == ".csv" and not root.is_dir():
        return scan_csv(root)
    if root.is_file():
        raise UserError(
            f"DATA '{root}' is a file; set DATA to an image folder or to a path,label[,split] "
            "CSV file named *.csv"
        )
    if not root.is_dir():
        raise UserError(
            f"DATA folder '{root}' does not exist; set DATA=path/to/images "
            "(class folders, train/ and validation/ with class folders inside, or a "
            "path,label[,split] CSV file)"
        )
    if (root / "train").is_dir():
        layout, split_dirs = "classic", {s: root / s for s in SPLITS if (root / s).is_dir()}
    else:
        layout, split_dirs = "flat", {"train": root}
    classes = _class_dirs(split_dirs["train"])
    if not classes:
        raise UserError(
            f"DATA folder '{split_dirs['train']}' has no class folders; put each class's images "
            "in a folder named after the class"
        )
    if len(classes) < 2:
        raise UserError(
            f"DATA folder '{split_dirs['train']}' has 1 class ('{classes[0]}'); a classifier "
            "needs at least two class folders"
        )
    warnings: list[str] = []
    if "validation" in split_dirs:
        extra = sorted(set(_class_dirs(split_dirs["validation"])) - set(classes))
        if extra:
            raise UserError(
                f"validation classes {extra} have no folder in '{split_dirs['train']}'; "
                "validation classes must also be training classes"
            )
    # One scan enters each folder once: a class folder only as its own class, and never a folder
    # above the class folders (split folders, DATA, DATA's parents), which would walk them again.
    class_dirs = [(s, lab, d / n) for s, d in split_dirs.items() for lab, n in enumerate(classes)]
    above = _ancestors(root, f"the class folders of '{display(str(root))}'")
    for folder in [root, *split_dirs.values()]:
        key = _key(folder)
        if key is not None:
            above[key] = f"'{display(str(folder))}', which contains class folders"
    fence = dict(above)
    for _, _, cdir in class_dirs:
        key = _key(cdir)
        if key is not None:
            fence.setdefault(key, f"the class folder '{display(str(cdir))}'")
    seen: set[Key] = set()
    items = Builder()  # streamed into columns: no object kept per file
    for split, label, cdir in class_dirs:
        if not cdir.is_dir():
            continue
        key = _key(cdir)
        if key in above:
            warnings.append(
                f"class folder '{display(str(cdir))}' links to {above[key]}; not entered, so no "
                "file is walked twice"
            )
        else:
            before = len(items)
            for folder, names in walk_folders(cdir, warnings, seen=seen, fence=fence):
                items.extend(Path(folder).relative_to(root).as_posix(), names, label, split)
            if len(items) > before:
                continue
        warnings.append(f"class folder '{cdir}' is empty")
    if not len(items):
        raise UserError(f"DATA folder '{root}' has class folders but no files in them")
    return Scan(root=root, layout=layout, classes=classes, items=items.done(), warnings=warnings)


def _csv_fields(header: list[str] | None, csv_file: Path) -> dict[str, int]:
    """Column index of path, label and split (optional) in a CSV header; UserError otherwise."""
    names = [(h or "").strip().lower() for h in header or []]
    if "path" not in names or "label" not in names:
        first = ",".join(header or [])[:80] or "nothing"
        raise UserError(
            f"DATA CSV '{csv_file}' must start with a header row path,label[,split] "
            f"(its first row is '{first}'); add that header"
        )
    return {k: names.index(k) for k in ("path", "label", "split") if k in names}


def _cell(row: list[str], col: dict[str, int], name: str) -> str:
    i = col.get(name)
    return row[i].strip() if i is not None and i < len(row) else ""


def _read_csv(csv_file: Path) -> list[tuple[int, str, str, str]]:
    """(line, path, label, split as written) of every non-blank row; paths normalised.

    A path written with Windows separators (`imgs\\a.png`) that does not exist as written is
    read with `/`.
    """
    out = []
    root = csv_file.parent
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            col = _csv_fields(next(reader, None), csv_file)
            for row in reader:
                if not any(c.strip() for c in row):
                    continue  # blank line
                raw, label, split = (_cell(row, col, k) for k in ("path", "label", "split"))
                if "\\" in raw and not os.path.lexists(root / raw):
                    raw = raw.replace("\\", "/")
                path = Path(os.path.normpath(raw)).as_posix() if raw else ""
                out.append((reader.line_num, path, label, split))
    except UnicodeDecodeError:
        raise UserError(f"DATA CSV '{csv_file}' is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"DATA CSV '{csv_file}' cannot be parsed ({e}); fix that line") from None
    except OSError as e:
        raise UserError(f"cannot read DATA CSV '{csv_file}' ({e.strerror}); check it") from None
    return out


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return (
        f"line {shown}"
        if len(numbers) == 1
        else f"lines {shown}" + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    )


def _same_label_spelled_twice(
    csv_file: Path, good: dict[str, tuple[str, str]], listed: dict[str, list[tuple[int, str, str]]]
) -> None:
    """Refuse labels that differ only in case or Unicode form (`Cat`, `cat`): one class or two?"""
    spellings: dict[str, dict[str, list[int]]] = {}
    for path, (lab, _) in good.items():
        norm = unicodedata.normalize("NFC", lab).casefold()
        spellings.setdefault(norm, {}).setdefault(lab, []).extend(n for n, _, _ in listed[path])
    for forms in spellings.values():
        if len(forms) > 1:
            said = ", ".join(f"'{f}' ({_lines(sorted(n))})" for f, n in sorted(forms.items()))
            raise UserError(
                f"DATA CSV '{csv_file}' spells one label {len(forms)} ways: {said}; labels are "
                "case-sensitive, so write each class one way"
            )


def scan_csv(csv_file: Path) -> Scan:
    """The images a `path,label[,split]` CSV lists, as a scan rooted at the CSV's folder.

    Paths are relative to the CSV's folder (absolute paths are taken as they are); split is
    train (the default) or validation. No row is dropped: an empty path or label, an unknown
    split, a file that does not exist or a path listed with two different labels or splits
    becomes a skipped item whose reason names the CSV line, so `make features` and the report
    list it with the unreadable files. Classes are the sorted distinct training labels; labels
    spelled two ways (`Cat`, `cat`) are refused. Items are ordered like a folder scan's (split,
    class, path): the rows' order never changes the cache.
    """
    if not csv_file.is_file():
        raise UserError(
            f"DATA CSV file '{csv_file}' does not exist; set DATA to a path,label[,split] CSV "
            "file or an image folder"
        )
    root, name = csv_file.parent, csv_file.name
    stat = _stat(csv_file)  # before reading: an edit while reading is seen next time
    rows = _read_csv(csv_file)
    if not rows:
        raise UserError(
            f"DATA CSV '{csv_file}' lists no image; list one image per row as path,label[,split]"
        )
    warnings: list[str] = []
    problems: list[Item] = []
    listed: dict[str, list[tuple[int, str, str]]] = {}
    for line, path, label, given in rows:
        split = given.lower() or "train"
        where = f"line {line} of {name}"
        if not path:
            why, path = f"empty path on {where}", f"{name}:{line}"
        elif not label:
            why = f"empty label on {where}"
        elif split not in SPLITS:
            why = f"split '{given}' on {where} is neither train nor validation"
        else:
            listed.setdefault(path, []).append((line, label, split))
            continue
        problems.append(Item(path=path, label=-1, split="train", problem=why))
    good: dict[str, tuple[str, str]] = {}
    for path, entries in listed.items():
        distinct = sorted({(lab, sp) for _, lab, sp in entries})
        lines = ", ".join(str(n) for n, _, _ in entries)
        if len(distinct) > 1:
            said = " and ".join(f"{lab} ({sp})" for lab, sp in distinct)
            why = f"listed as {said} on lines {lines} of {name}; keep one row"
            problems.append(Item(path=path, label=-1, split="train", problem=why))
            continue
        if len(entries) > 1:
            warnings.append(
                f"'{display(path)}' is listed {len(entries)} times ({name} lines {lines})"
            )
        good[path] = distinct[0]
    _same_label_spelled_twice(csv_file, good, listed)
    classes = sorted({lab for lab, sp in good.values() if sp == "train"})
    extra = sorted({lab for lab, sp in good.values() if sp == "validation"} - set(classes))
    if extra:
        lines = sorted(n for p, (lab, _) in good.items() if lab in extra for n, _, _ in listed[p])
        raise UserError(
            f"validation labels {extra} in '{csv_file}' ({_lines(lines)}) have no usable "
            "training row; validation labels must also be training labels"
        )
    if len(classes) < 2:
        raise UserError(
            f"DATA CSV '{csv_file}' has {len(classes)} label "
            f"({', '.join(repr(c) for c in classes) or 'none'}) in its usable training rows; "
            "a classifier needs at least two labels"
            + (f" (e.g. {problems[0].problem})" if problems else "")
        )
    exists = {p: os.path.lexists(root / p) for p in good}
    with_files = sorted({lab for p, (lab, sp) in good.items() if sp == "train" and exists[p]})
    if len(with_files) < 2:
        raise UserError(
            f"only {len(with_files)} of the {len(classes)} labels in '{csv_file}' have a "
            f"training image that exists under '{display(str(root.resolve()))}'; paths are "
            "relative to the CSV's folder: fix them, a classifier needs at least two labels"
        )
    for lab in sorted(set(classes) - set(with_files)):
        lines = sorted(n for p, (la, _) in good.items() if la == lab for n, _, _ in listed[p])
        warnings.append(
            f"label '{lab}' has no existing training image ({name} {_lines(lines)}); it stays a "
            "class that no head can predict"
        )
    missing = sorted(p for p, ok in exists.items() if not ok)
    if missing:
        warnings.append(
            f"{len(missing)} path(s) in {name} do not exist under "
            f"'{display(str(root.resolve()))}' (e.g. '{display(missing[0])}'); paths are relative "
            "to the CSV's folder; they are listed as skipped"
        )
    label_of = {c: i for i, c in enumerate(classes)}
    items = []
    for path, (lab, sp) in good.items():
        why = (
            ""
            if exists[path]
            else f"listed on line {listed[path][0][0]} of {name} but does not exist"
        )
        items.append(Item(path=path, label=label_of[lab], split=sp, problem=why))
    order = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))
    problems.sort(key=lambda it: it.path)
    return Scan(
        root=root,
        layout="csv",
        classes=classes,
        items=Listing.of(items + problems),
        warnings=warnings,
        source=csv_file,
        source_sha256=csv_digest(rows),
        source_stat=stat,
    )


def listed_images(f: Path) -> list[tuple[str, Path]] | None:
    """(path as written, file) of each image a list file names, or None if `f` is no list.

    A `.txt`/`.lst` file of text holds one path per line (blank lines and `#` comments
    ignored); a `.csv` file has a header row with a `path` column (other columns ignored, as
    in DATA's CSV). Paths are relative to the list's folder (absolute ones taken as they are).
    A file of another name, or one whose bytes are not text (an image named `.txt`), is None.
    """
    suffix = f.suffix.lower()
    if suffix not in (".txt", ".lst", ".csv") or not f.is_file():
        return None
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read IMAGES list '{f}' ({e.strerror}); check it") from None
    if b"\0" in raw[:8192]:
        return None  # binary: an image with an odd name, read (or refused) as one
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"IMAGES list '{f}' is not UTF-8 text; save it as UTF-8") from None
    if suffix == ".csv":
        try:
            reader = csv.reader(text.splitlines())
            header = [(h or "").strip().lower() for h in next(reader, None) or []]
            if "path" not in header:
                first = ",".join(header)[:80] or "nothing"
                raise UserError(
                    f"IMAGES CSV '{f}' must start with a header row naming a path column "
                    f"(its first row is '{first}'); add that header"
                )
            col = header.index("path")
            written = [row[col].strip() for row in reader if col < len(row) and row[col].strip()]
        except csv.Error as e:
            raise UserError(f"IMAGES CSV '{f}' cannot be parsed ({e}); fix that line") from None
    else:
        written = [ln.strip() for ln in text.splitlines()]
        written = [ln for ln in written if ln and not ln.startswith("#")]
    if not written:
        raise UserError(f"IMAGES list '{f}' names no image; write one path per line")
    root, out = f.parent, []
    for w in written:
        if "\\" in w and not os.path.lexists(root / w):
            w = w.replace("\\", "/")
        w = Path(os.path.normpath(w)).as_posix()
        out.append((display(w), root / w))
    return out


def images_in(path: Path) -> list[tuple[str, Path]]:
    """(path as shown, file) of each image IMAGES names: the files under a folder (walked as
    DATA's are), those a list file names (`listed_images`), or the file itself."""
    if path.is_dir():
        files = walk_files(path)
        if not files:
            raise UserError(f"IMAGES folder '{path}' has no files")
        return [(display(f.relative_to(path).as_posix()), f) for f in files]
    named = listed_images(path)
    return named if named is not None else [(display(path.name), path)]

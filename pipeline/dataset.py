"""Dataset scanning: class folders to (path, class, split); images are recognised later, by content.

Layouts: `DATA/train/<class>/...` with optional `DATA/validation/<class>/...` (classic), or a flat
`DATA/<class>/...`. Class names are the sorted folder names. Files in nested folders belong to their
class folder. Hidden files and OS junk are ignored. One scan enters each folder once: a link to a
folder already walked, to another class's folder or to a folder above them is not followed (a
warning names it), so no image is embedded twice or under another class's label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

JUNK_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
JUNK_DIRS = {"__macosx", "@eadir", "$recycle.bin", "lost+found"}
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Item:
    """One candidate file: `path` is relative to the data root (POSIX separators)."""

    path: str
    label: int
    split: str


@dataclass
class Scan:
    """What a scan found: the class names, every candidate file and the warnings to show."""

    root: Path
    layout: str
    classes: list[str]
    items: list[Item]
    warnings: list[str] = field(default_factory=list)

    def count(self, split: str) -> int:
        return sum(1 for it in self.items if it.split == split)


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

    `seen` holds the folders already walked; share one set to walk several tops as one scan.
    `fence` maps folders never to enter to a description (other class folders, the folders
    above them); the folders above `top` are always fenced. Each link refused for either reason,
    and each folder that cannot be read, is reported in `warnings`, never silently dropped.
    """
    seen = set() if seen is None else seen
    fence = {**_ancestors(top, f"'{display(str(top))}'"), **(fence or {})}
    out: list[Path] = []

    def warn(msg: str) -> None:
        if warnings is not None:
            warnings.append(msg)

    def onerror(e: OSError) -> None:
        warn(f"cannot read folder '{e.filename}' ({e.strerror}); its files are left out")

    top_key = _key(top)
    if top_key in seen:
        warn(f"folder '{display(str(top))}' is reached again through a link; walked once")
        return out
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
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not _ignored(f))
    return out


def scan(root: str | os.PathLike[str]) -> Scan:
    """Find the layout, the classes and every candidate file under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"DATA folder '{root}' does not exist; set DATA=path/to/images "
            "(class folders, or train/ and validation/ with class folders inside)"
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
    items: list[Item] = []
    for split, label, cdir in class_dirs:
        if not cdir.is_dir():
            continue
        key = _key(cdir)
        if key in above:
            warnings.append(
                f"class folder '{display(str(cdir))}' links to {above[key]}; not entered, so no "
                "file is walked twice"
            )
            files = []
        else:
            files = walk_files(cdir, warnings, seen=seen, fence=fence)
        if not files:
            warnings.append(f"class folder '{cdir}' is empty")
        items.extend(
            Item(path=f.relative_to(root).as_posix(), label=label, split=split) for f in files
        )
    if not items:
        raise UserError(f"DATA folder '{root}' has class folders but no files in them")
    return Scan(root=root, layout=layout, classes=classes, items=items, warnings=warnings)

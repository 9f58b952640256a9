"""Dataset scanning: class folders to (path, class, split); images are recognised later, by content.

Layouts: `DATA/train/<class>/...` with optional `DATA/validation/<class>/...` (classic), or a flat
`DATA/<class>/...`. Class names are the sorted folder names. Files in nested folders belong to their
class folder. Hidden files and OS junk are ignored; directory symlink loops are walked once.
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


def walk_files(top: Path, warnings: list[str] | None = None) -> list[Path]:
    """Non-hidden files under `top`, following directory symlinks, never entering a folder twice.

    A folder that cannot be read is reported in `warnings`, never silently dropped.
    """
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []

    def onerror(e: OSError) -> None:
        if warnings is not None:
            warnings.append(
                f"cannot read folder '{e.filename}' ({e.strerror}); its files are left out"
            )

    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d) and d.lower() not in JUNK_DIRS)
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
    items: list[Item] = []
    for split, folder in split_dirs.items():
        for label, name in enumerate(classes):
            cdir = folder / name
            if not cdir.is_dir():
                continue
            files = walk_files(cdir, warnings)
            if not files:
                warnings.append(f"class folder '{cdir}' is empty")
            items.extend(
                Item(path=f.relative_to(root).as_posix(), label=label, split=split) for f in files
            )
    if not items:
        raise UserError(f"DATA folder '{root}' has class folders but no files in them")
    return Scan(root=root, layout=layout, classes=classes, items=items, warnings=warnings)

"""What could differ between runs (versions, platform, time), recorded beside every result."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

PACKAGES = ("pipeline", "tensorflow", "keras", "scikit-learn", "numpy", "h5py", "joblib", "pillow")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that determine results, read without importing them."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def embedder() -> dict[str, str | None]:
    """What turns a file into features besides the settings: the decoders and the framework.

    Recorded per cache row, so an upgrade can never mix two decoders in one cache silently.
    """
    from PIL import features as pil_features

    libs = {}
    for lib in ("jpg", "zlib", "libtiff", "webp"):
        try:
            libs[lib] = pil_features.version(lib)
        except (ValueError, KeyError):
            libs[lib] = None
    pk = package_versions()
    return {
        "pillow": pk["pillow"],
        **{f"pillow-{k}": v for k, v in libs.items()},
        "keras": pk["keras"],
        "tensorflow": pk["tensorflow"],
        "numpy": pk["numpy"],
    }


def difference(a: dict[str, object], b: dict[str, object]) -> str:
    """`name a -> b` for every entry that differs, for one-line messages."""
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k))


def environment() -> dict[str, object]:
    """Versions, Python, platform and a UTC timestamp."""
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }

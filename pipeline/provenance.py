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


def environment() -> dict[str, object]:
    """Versions, Python, platform and a UTC timestamp."""
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

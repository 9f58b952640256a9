"""`make bench`'s measuring instruments (its figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline import bench


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    """On Linux a child's ru_maxrss starts at its parent's; the bench reads the child's own."""
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched, in this (parent) process
    code = f"print({bench.PEAK_EXPR} // 1024)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_mib = int(out.stdout)
    assert 0 < child_mib < 200, child_mib
    assert big.sum() > 0

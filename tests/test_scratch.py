"""`outputs.scratch`: large temporary files beside the data, never left behind."""

from __future__ import annotations

import os

from pipeline import outputs


def test_a_scratch_folder_is_removed_and_a_killed_processs_is_removed_next_time(tmp_path):
    host = outputs.scratch_owner()
    with open("/proc/sys/kernel/pid_max") as fh:
        dead = int(fh.read()) + 1  # no process has it
    left = tmp_path / f".space-{host}-{dead}-abc"  # a killed audit's space
    left.mkdir()
    (left / "space.npy").write_bytes(b"x" * 100)
    alive = tmp_path / f".space-{host}-{os.getppid()}-def"  # a running process's: kept
    alive.mkdir()
    other = tmp_path / f".space-otherhost_1-{dead}-ghi"  # another host's or container's: kept
    other.mkdir()
    with outputs.scratch(tmp_path, "space") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".space-{host}-{os.getpid()}-")
        (tmp / "big.npy").write_bytes(b"y")
        assert not left.exists() and alive.exists() and other.exists()
    assert not tmp.exists()


def test_a_folder_that_cannot_be_written_gives_a_scratch_folder_elsewhere(tmp_path, monkeypatch):
    ro = tmp_path / "shared-cache"  # a read-only shared cache (as root, refused here by hand)
    ro.mkdir()
    real = outputs.tempfile.mkdtemp

    def mkdtemp(prefix=None, dir=None):
        if dir is not None and os.path.samefile(dir, ro):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(prefix=prefix, dir=dir)

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", mkdtemp)
    with outputs.scratch(ro, "near") as tmp:
        assert tmp.is_dir() and tmp.parent != ro and tmp.name.startswith(".near-")
    assert not tmp.exists()

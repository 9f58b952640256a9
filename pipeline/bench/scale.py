"""The store at N and 10N rows (random maps, no backbone): +1 %, an unchanged rerun, train-head."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.backbone import BackboneSpec
from pipeline.bench.instruments import RandomMaps, cli_peak, say, tiny_images
from pipeline.features import extract


def _written(folder: Path, before: dict[str, tuple[int, int]]) -> int:
    """Bytes of the files under `folder` that are new or were rewritten since `before`."""
    total = 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            if before.get(str(p)) != (st.st_ino, st.st_mtime_ns):
                total += st.st_size
    return total


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def scale(work: Path, cfg: dict[str, int]) -> dict[str, Any]:
    """The store at N and 10N rows (224 px maps, random, no backbone): +1 %, reruns, train-head."""
    shape = (7, 7, 512)
    spec = BackboneSpec("none", input_size=224)
    out: dict[str, Any] = {"map": list(shape), "sizes": {}}
    for n in (cfg["scale_n"], 10 * cfg["scale_n"]):
        data, art = work / f"scale-data-{n}", work / f"scale-art-{n}"
        tiny_images(data, 0, n)
        model = RandomMaps(shape)
        t = time.perf_counter()
        first = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        build_s = time.perf_counter() - t
        fdir = first.cache.parent
        cache_bytes = sum(p.stat().st_size for p in fdir.rglob("*") if p.is_file())
        before = _files(fdir)
        add = max(1, n // 100)
        tiny_images(data, n, add)
        t = time.perf_counter()
        plus = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        add_s = time.perf_counter() - t
        add_bytes = _written(fdir, before)
        untouched = all(
            _files(fdir).get(k) == v for k, v in before.items() if "/g" in k and ".shards" in k
        )
        t = time.perf_counter()
        again = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        unchanged_s = time.perf_counter() - t
        head_s, kib = cli_peak(
            ["train-head", "--head", "logreg", "--pool", "avg", "--features", str(plus.cache),
             "--artifacts", str(work / f"scale-heads-{n}"), "--folds", "5"]
        )  # fmt: skip
        row = {
            "rows": n,
            "full_build_s": build_s,
            "cache_bytes": cache_bytes,
            "added_rows": add,
            "added_bytes_written": add_bytes,
            "added_bytes_per_row": add_bytes / add,
            "added_s": add_s,
            "existing_segments_untouched": untouched,
            "unchanged_rerun_s": unchanged_s,
            "unchanged_rerun_new": again.new,
            "train_head_logreg_avg_s": head_s,
            "train_head_logreg_avg_peak_mib": kib / 1024,
        }
        out["sizes"][str(n)] = row
        say(
            f"  {n} rows: +{add} rows wrote {add_bytes / 1e6:.1f} MB in {add_s:.2f} s; "
            f"unchanged rerun {unchanged_s:.2f} s; train-head logreg avg {head_s:.1f} s, "
            f"{kib / 1024:.0f} MiB peak"
        )
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(art, ignore_errors=True)
    a, b = (out["sizes"][str(k)] for k in (cfg["scale_n"], 10 * cfg["scale_n"]))
    out["added_cost_ratio_10n_over_n_per_row"] = b["added_bytes_per_row"] / a["added_bytes_per_row"]
    return out

"""`make bench`'s measuring instruments (its figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.bench import instruments


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    """On Linux a child's ru_maxrss starts at its parent's; the bench reads the child's own."""
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched, in this (parent) process
    code = f"print({instruments.PEAK_EXPR} // 1024)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_mib = int(out.stdout)
    assert 0 < child_mib < 200, child_mib
    assert big.sum() > 0


def test_the_store_at_scale_part_measures_through_the_store(tmp_path):
    from pipeline.bench.store import store_at_scale

    res = store_at_scale(tmp_path, (600, 1200), batch=32, heads=False)
    small, big = res["sizes"]["600"], res["sizes"]["1200"]
    assert (small["batches"], big["batches"]) == (19, 38)
    assert big["peak_open_files_reading"] - big["open_files_before_reading"] <= 3
    assert len(big["plus_1pct_bytes"]) == 10 and all(b > 0 for b in big["plus_1pct_bytes"])
    assert res["rows_growth"] == 2


def test_the_heads_part_measures_each_head_in_one_process(tmp_path):
    """logreg and sgd through the command, each alone (--jobs 1): seconds, peak, protocol."""
    from pipeline.bench import store as bench_store

    path = tmp_path / "cache.h5"
    bench_store.sync(path, bench_store._rows(0, 400), batch=200, channels=16, signal=0.6)
    res = bench_store.heads_on(path, tmp_path / "art")
    for head in ("logreg", "sgd"):
        r = res[f"train_head_{head}"]
        assert r["s"] > 0 and 30 < r["peak_mib"] < 4000
        assert r["protocol"] == "k-fold" and r["low"] <= r["accuracy"] <= r["high"]
    runs = {p.name.split("-")[0] for p in (tmp_path / "art" / "heads").glob("*-*")}
    assert runs == {"logreg", "sgd"}


def test_the_audit_part_builds_a_cache_and_audits_it_with_the_products_code(tmp_path, monkeypatch):
    """`make bench`'s audit part on a small size, in this process: the synthetic cache and run
    are built, the product's audit reads them, and the figures it prints are measured."""
    from pipeline import collection_map, neighbours
    from pipeline.bench import know

    # `audit` times the search and the map by wrapping them (meant for a fresh process):
    # restored after this test
    monkeypatch.setattr(neighbours, "search", neighbours.search)
    monkeypatch.setattr(collection_map, "embed_2d", collection_map.embed_2d)
    monkeypatch.setattr(collection_map, "SAMPLE", 150)
    built = know.build(1200, tmp_path)
    assert built["recall_at_10"] == 1.0  # exact search at this size
    r = know.audit(tmp_path)
    assert r["search"] == "exact" and r["map_points"] == 150
    assert 8 <= r["near_sets"] <= 13  # 12 planted signature copies (a few may coincide)
    assert r["label_recall"] > 0.8 and r["label_precision"] > 0.5
    assert r["search_s"] > 0 and r["peak_rss_mib"] > 0

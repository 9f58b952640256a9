"""The features `make predict` finds instead of running the backbone, and where it keeps new ones.

An image is looked up by content (SHA-256) in the run's own cache (any split: an image that was
embedded for training is never embedded again) and then in the predicted-images store beside it
(`layout.predicted_path`, a `store.content` store under the same cache key); TTA's views (the
image's content and view number, drawn with the run's seed) in the cache's views of that seed
and then the predicted views store. Only rows under the run's cache key (which
`cache_identity.check_features` has checked this installation makes) and made by this
installation's decoder/framework versions are used. What the backbone embeds is added to the
predicted stores, so predicting the same images again (another head, after retraining, a
rerun) runs no backbone at all.

Only one predict writes a store at a time; another one at the same moment reads the stores and
keeps what it embeds to itself (said in one line). A store that cannot be written (read-only
ARTIFACTS, a full disk) is said once and predict goes on without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout, store
from pipeline.cache_identity import augment_settings
from pipeline.errors import UserError
from pipeline.provenance import embedder
from pipeline.store.content import STORE, ContentStore, Lookup

Log = Callable[[str], None]
Stat = tuple[int, int, int]
# what a store that cannot be written now raises (a full disk, a read-only folder, a file that
# HDF5 cannot read): said, and predict goes on without keeping features
FAILURES = (UserError, OSError, KeyError, ValueError)


class Cache:
    """The lookups (and stores) of one predict with run `r`: see the module doc.

    Kind 0 is the images themselves, kind 1 (with `tta`) their augmented views.
    """

    def __init__(self, artifacts: Path, r: dict[str, Any], tta: int, seed: int, log: Log) -> None:
        self.log = log
        self.pooling = r["pooling"]
        self.dataset = (
            f"pooled/{self.pooling}" if self.pooling in store.POOLINGS[:2] else "features"
        )
        self.locks = ExitStack()
        self.sources: list[list[Lookup]] = [[], []]
        self.stores: list[ContentStore | None] = [None, None]
        feats = r["features"]
        if "file" not in feats:  # a run of an older pipeline: no cache named, nothing looked up
            return
        settings = feats["settings"]
        stamp = embedder()
        cache = layout.cache_by_name(artifacts, feats["file"])
        kinds = [(cache, feats["cache_key"], settings)]
        if tta:
            aset = augment_settings(settings, seed)
            kinds.append((layout.augment_path(cache, seed), store.cache_key(aset), aset))
        attrs = {
            "weights": feats.get("weights"),
            "random_weights": bool(feats.get("random_weights")),
            "cache": cache.name,
        }
        try:
            for k, (path, key, made) in enumerate(kinds):
                self.sources[k] = self._lookups(
                    path, key, stamp, made, {**attrs, "settings": made}, k
                )
        except BaseException:  # nothing half-made keeps its locks for the process's life
            self.locks.close()
            raise

    def _lookups(
        self,
        path: Path,
        key: str,
        stamp: dict[str, Any],
        settings: dict[str, Any],
        attrs: dict[str, Any],
        kind: int,
    ) -> list[Lookup]:
        out = []
        stamp_key = store.cache_key(stamp)
        if path.is_file():
            try:
                out.append(Lookup.of(path, key, stamp_key, self.log))
            except UserError:
                pass  # gone, damaged or of other settings since: the run says it is stale
        ppath = layout.predicted_path(path)
        try:
            self.locks.enter_context(store.exclusive(store.shards_dir(ppath), "make predict"))
            st = ContentStore(
                ppath,
                key,
                stamp,
                bool(settings.get("maps", True)),
                settings["dtype"],
                attrs,
                self.log,
            )
        except FAILURES as e:
            self.log(f"the features of new images are not kept this time ({e})")
            if ppath.is_file():
                try:
                    out.append(Lookup.of(ppath, key, stamp_key, self.log, STORE))
                except UserError:
                    pass
            return out
        self.stores[kind] = st
        return [*out, st.lookup]

    def find(self, shas: Sequence[str | None], views: int) -> list[list[np.ndarray | None]]:
        """Per image, per view 0..`views`: its pooled features (the run's pooling), or None
        (to be embedded). An image without a hash (unreadable) finds nothing."""
        out: list[list[np.ndarray | None]] = [[None] * (views + 1) for _ in shas]
        for v in range(views + 1):
            want = [(i, store.ident(h, v)) for i, h in enumerate(shas) if h]
            for src in self.sources[min(v, 1)]:
                if not want:
                    break
                with store.reading(src.folder.parent):  # nothing found is collected before read
                    where = src.find([h for _, h in want])
                    hits = [(i, w) for (i, _), w in zip(want, where, strict=True) if w is not None]
                    block, ok = src.read([w for _, w in hits], self.dataset)
                if block is not None and ok.any():
                    x = store.pool(block, "flatten") if block.ndim > 2 else block
                    for (i, _), good, row in zip(hits, ok.tolist(), x, strict=True):
                        if good:
                            out[i][v] = row
                want = [(i, h) for i, h in want if out[i][v] is None]
        return out

    def add(
        self,
        rows: Sequence[tuple[str, str, int, Stat]],
        maps: np.ndarray,
    ) -> None:
        """Keep the maps (stored type) of rows embedded now: (path, sha256, view, stat) each."""
        for kind in (0, 1):
            st = self.stores[kind]
            mine = [k for k, (_, _, v, _) in enumerate(rows) if min(v, 1) == kind]
            if st is None or not mine:
                continue
            try:
                st.add(
                    [store.ident(rows[k][1], rows[k][2]) for k in mine],
                    [rows[k][0] for k in mine],
                    [rows[k][3] for k in mine],
                    maps[mine],
                )
            except FAILURES as e:
                self._drop(kind, e)

    def _drop(self, kind: int, e: BaseException) -> None:
        st = self.stores[kind]
        self.stores[kind] = None
        if st is not None:
            self.log(
                f"warning: cannot keep the features of new images in '{st.path}' ({e}); "
                "predict goes on without keeping them"
            )

    def close(self, merge: bool = True) -> None:
        """Write what was gathered (`merge`: then merge segments), and let the stores go."""
        try:
            for kind in (0, 1):
                st = self.stores[kind]
                if st is not None:
                    try:
                        st.close(merge)
                    except FAILURES as e:
                        self._drop(kind, e)
        finally:
            self.locks.close()

"""The feature store: one small index per backbone setting over few large immutable segments.

Modules, one concern each: `format` (conventions, keys, atomic writes), `segments` (the files
holding rows and features), `segment_writer` (writing them; rows copied into new ones), `damage`
(a segment that cannot be read), `manifest` (the index file naming them), `reader` (features for
a head, one open file at a time), `pooling` (what POOL reads), `rows` (rows named, read block by
block), `merging` (when segments merge), `staging` (a run's batches before its commit), `log`
(the segment log both stores write through: staging, merges, garbage collection), `writer` (a
run's commit), `content` (rows found by content alone), `keys` (each segment's key table),
`digests` (each chunk's CRC-32), `locks` (one writer, readers that keep their files).
"""

from pipeline.errors import UserError
from pipeline.store.format import (
    FORMAT_VERSION,
    POOLINGS,
    STR,
    CacheError,
    cache_key,
    data_id,
    disk_error,
    ident,
    replacing,
)
from pipeline.store.locks import exclusive, reading
from pipeline.store.manifest import (
    Entry,
    Index,
    index_of,
    open_cache,
    read_attrs,
    read_index,
    shards_dir,
)
from pipeline.store.pooling import f_shape, pool, width
from pipeline.store.reader import (
    ColumnOf,
    Features,
    WithViews,
    features_of,
    load_features,
    read_column,
    texts,
)
from pipeline.store.rows import Rows, materialize
from pipeline.store.segments import missing_maps

__all__ = [
    "FORMAT_VERSION",
    "POOLINGS",
    "STR",
    "CacheError",
    "ColumnOf",
    "Entry",
    "Features",
    "Index",
    "Rows",
    "UserError",
    "WithViews",
    "cache_key",
    "data_id",
    "disk_error",
    "exclusive",
    "f_shape",
    "features_of",
    "ident",
    "index_of",
    "load_features",
    "materialize",
    "missing_maps",
    "open_cache",
    "pool",
    "read_attrs",
    "read_column",
    "read_index",
    "reading",
    "replacing",
    "shards_dir",
    "texts",
    "width",
]

"""What a feature cache is: every setting that determines its features, hashed into its key.

`make features` names its cache by these settings; a run records them; `make predict` and every
reader recompute them from this installation (`check_features`) and refuse features made any
other way. The augmented views' cache adds the augmentation policy and its seed.
"""

from __future__ import annotations

from typing import Any

from pipeline import images
from pipeline.backbone import BackboneSpec, spec_from_settings
from pipeline.errors import UserError
from pipeline.provenance import difference
from pipeline.store.format import FORMAT_VERSION, cache_key

DTYPES = ("float16", "float32")
RANDOM_BANNER = (
    "RANDOM WEIGHTS: features come from an untrained VGG16 (WEIGHTS=none); accuracies are NOT "
    "those of transfer learning"
)


def cache_settings(spec: BackboneSpec, dtype: str, maps: bool = True) -> dict[str, Any]:
    """Every setting that determines the cached features; hashed into the cache key.

    The weights enter by content (`weights_id`), never by path or spelling.
    """
    if dtype not in DTYPES:
        raise UserError(f"DTYPE must be one of {', '.join(DTYPES)}; got '{dtype}'")
    return {
        **spec.settings(),
        "resize": images.RESIZE_POLICY,
        "background": list(images.BACKGROUND),
        "loader_version": images.LOADER_VERSION,
        "dtype": dtype,
        "maps": maps,
        "format_version": FORMAT_VERSION,
    }


def augment_settings(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """The augmented-views cache's settings: the backbone's, plus the augmentation policy."""
    return {**settings, "augment": images.AUGMENT_POLICY, "augment_seed": seed}


def check_features(r: dict[str, Any], weights: str | None = None) -> BackboneSpec:
    """The spec that makes the run's features here and now; a different cache key is refused."""
    feats = r["features"]
    settings = feats["settings"]
    spec = spec_from_settings(settings, weights, hint=feats.get("weights"))
    now = cache_settings(spec, settings["dtype"], settings.get("maps", True))
    if cache_key(now) != feats["cache_key"]:
        diff = difference(settings, now) or "the cache key"
        raise UserError(
            f"run '{r['run']}' was trained on features this installation no longer makes "
            f"({diff}); rerun `make features` and `make train-head`"
        )
    return spec

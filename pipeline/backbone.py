"""The frozen backbone: Keras 3 VGG16 without its top, cut at a named layer, and its preprocessing.

Weights are `imagenet` (Keras' own download and cache), `none` (random init, seeded: said loudly
everywhere its features are used) or a path to a VGG16 no-top weights file (`.h5` or
`.weights.h5`). Their identity, not their path, enters the cache key. TensorFlow is imported only
when a model is built, so scanning and the scikit-learn heads never pay for it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

LAYERS = ("block5_pool", "block5_conv3", "block4_pool", "block3_pool")
IMAGENET_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"  # the file_hash Keras checks on download
PREPROCESSING = (
    "keras.applications.vgg16.preprocess_input (caffe: RGB->BGR, ImageNet mean, no scaling)"
)
MIN_SIZE = 32
# mixed precision computes in 16 bits on a GPU (tensor cores); its accuracy cost is measured
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read `chunk` bytes at a time (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines the backbone's output for a given input image."""

    weights: str = "imagenet"
    layer: str = "block5_pool"
    input_size: int = 224
    seed: int = 0
    name: str = "vgg16"
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise UserError(f"LAYER must be one of {', '.join(LAYERS)}; got '{self.layer}'")
        if not isinstance(self.input_size, int) or self.input_size < MIN_SIZE:
            raise UserError(
                f"SIZE must be an integer of at least {MIN_SIZE} (VGG16's five poolings); "
                f"got {self.input_size!r}"
            )
        if self.precision not in PRECISIONS:
            raise UserError(
                f"PRECISION must be one of {', '.join(PRECISIONS)}; got '{self.precision}'"
            )
        kind = self.weights_kind
        if kind == "file" and not Path(self.weights).is_file():
            raise UserError(
                f"WEIGHTS file '{self.weights}' does not exist; pass WEIGHTS=/path/to/"
                f"{IMAGENET_NOTOP} (or imagenet / none)"
            )

    @property
    def weights_kind(self) -> str:
        w = self.weights.lower()
        return "imagenet" if w == "imagenet" else "none" if w in ("none", "random") else "file"

    @property
    def random_weights(self) -> bool:
        return self.weights_kind == "none"

    def weights_id(self) -> str:
        """Identity of the weights by content: moving a weights file does not invalidate a cache."""
        kind = self.weights_kind
        if kind == "imagenet":
            return f"imagenet:{IMAGENET_NOTOP}:md5={IMAGENET_NOTOP_MD5}"
        if kind == "none":
            return f"random:seed={self.seed}:{RANDOM_INIT}"
        return f"file:sha256={file_sha256(self.weights)}"

    def settings(self) -> dict[str, Any]:
        """The settings that enter the cache key (weights by identity, not by path)."""
        d = asdict(self)
        d.pop("weights")  # a path or a spelling ('ImageNet'): the identity below is what counts
        d["weights_id"] = self.weights_id()
        d["preprocessing"] = PREPROCESSING
        if not self.random_weights:
            d.pop("seed")  # the seed only matters for random weights
        return d


def spec_from_settings(
    settings: dict[str, Any], weights: str | None = None, hint: str | None = None
) -> BackboneSpec:
    """Rebuild the spec a cache was made with; the weights must be the same by content.

    `weights` is where the user says the weights are now; `hint` where they were at extraction.
    """
    w = weights or hint or settings.get("weights") or settings["weights_id"].split(":")[0]
    spec = BackboneSpec(
        weights=w,
        layer=settings["layer"],
        input_size=int(settings["input_size"]),
        seed=int(settings.get("seed", 0)),
        name=settings["name"],
        precision=settings.get("precision", "float32"),
    )
    if spec.weights_id() != settings["weights_id"]:
        raise UserError(
            f"WEIGHTS '{w}' are not the weights the cache was made with "
            f"({settings['weights_id']}); pass the same WEIGHTS as for `make features`"
        )
    return spec


RANDOM_INIT = "numpy-glorot-uniform-v1"


def seeded_init(model: Any, seed: int) -> None:
    """Glorot-uniform kernels and zero biases from NumPy, seeded: the same in every process.

    Keras' own seeded initialisation depends on its global, per-thread random state: a model
    built a second time in a Dask worker's other thread came out different. These weights do not.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        new = []
        for w in layer.get_weights():
            if w.ndim >= 2:
                receptive = int(np.prod(w.shape[:-2]))
                fan_in, fan_out = receptive * w.shape[-2], receptive * w.shape[-1]
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                new.append(rng.uniform(-limit, limit, w.shape).astype(w.dtype))
            else:
                new.append(np.zeros_like(w))
        if new:
            layer.set_weights(new)


def _load_base(spec: BackboneSpec) -> Any:
    import keras  # TensorFlow's log level and the backend are set in pipeline/__init__.py

    shape = (spec.input_size, spec.input_size, 3)
    kind = spec.weights_kind
    if kind == "none":
        model = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
        seeded_init(model, spec.seed)
        return model
    if kind == "imagenet":
        try:
            return keras.applications.VGG16(
                weights="imagenet", include_top=False, input_shape=shape
            )
        except Exception as e:  # Keras raises a bare Exception on a failed download
            raise UserError(
                "could not download the ImageNet VGG16 weights (offline?): "
                f"{str(e).splitlines()[0][:160]}; download {IMAGENET_NOTOP} where you have "
                "internet and pass WEIGHTS=/path/to/notop.h5"
            ) from None
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
    try:
        model.load_weights(spec.weights)
    except Exception as e:
        raise UserError(
            f"WEIGHTS file '{spec.weights}' could not be loaded into VGG16 without its top "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); pass a "
            f"VGG16 no-top weights file such as {IMAGENET_NOTOP}"
        ) from None
    return model


def build(spec: BackboneSpec) -> Any:
    """The frozen VGG16, cut at `spec.layer`, as a Keras model taking preprocessed float32."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(spec.precision)
    try:
        base = _load_base(spec)
    finally:
        keras.config.set_dtype_policy(previous)
    model = keras.Model(base.input, base.get_layer(spec.layer).output, name=f"vgg16_{spec.layer}")
    model.trainable = False
    return model


def preprocess(batch: np.ndarray) -> np.ndarray:
    """VGG16's own preprocessing (caffe mode) on a uint8 RGB batch; never 1/255."""
    from keras.applications import vgg16

    return vgg16.preprocess_input(batch.astype(np.float32))


def output_shape(spec: BackboneSpec) -> tuple[int, int, int]:
    """Shape of one image's features at `spec.layer` without building the model."""
    s = spec.input_size
    pools = {"block5_pool": 5, "block5_conv3": 4, "block4_pool": 4, "block3_pool": 3}[spec.layer]
    channels = 256 if spec.layer == "block3_pool" else 512
    for _ in range(pools):
        s //= 2
    return (s, s, channels)

"""The frozen backbone: a registry of Keras Applications models, each with its own preprocessing.

`BACKBONE` picks one (VGG16 by default). Each entry knows its constructor, its preprocessing
(the most common silent error with these models is the wrong one), its default input size, the
layers that may be cached (the last feature stage by default, and the earlier stage that
fine-tuning starts from) and the Keras ImageNet weights file it expects. Weights are `imagenet`
(Keras' own download and cache), `none` (random init, seeded: said loudly everywhere its
features are used) or a no-top weights file for that backbone. Their identity, not their path,
enters the cache key. TensorFlow is imported only when a model is built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

OUTPUT = "output"  # the model's own last layer, where its name is not stable across sessions
# Compute precision of the forward pass (the stored type is DTYPE). Mixed policies compute in 16
# bits (weights and accumulation stay float32): on GPU tensor cores, and on x86 CPUs with native
# bfloat16 (AVX512-BF16, AMX), about twice as fast as float32 there; its accuracy cost is measured
# (tests/test_precision.py, `make bench`). `auto` resolves to one of these before anything is
# hashed, so a cache, a run and a report only ever name a concrete one.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # /proc/cpuinfo names, x86
PREPROCESSING = {
    "caffe": "RGB->BGR, ImageNet mean subtracted, no scaling (caffe)",
    "tf": "scaled to [-1, 1] (tf)",
    "built-in": "none outside the model: 0-255 RGB in, the model rescales (built-in)",
}


@dataclass(frozen=True)
class Family:
    """One registered backbone: how to build it, feed it, and which of its layers to cache."""

    name: str
    constructor: str  # attribute of keras.applications
    module: str  # keras.applications submodule whose preprocess_input it uses
    preprocessing: str  # a key of PREPROCESSING
    default_size: int
    layers: tuple[str, ...]  # cacheable; the first is the default (the last feature stage)
    finetune_from: str | None  # the cached layer fine-tuning starts from (None: cannot)
    imagenet_file: str
    min_size: int
    gmac: float  # multiply-accumulates per image at 224 px (299 for InceptionV3), published
    top1: float  # ImageNet top-1 accuracy of the full model, Keras Applications table


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("vgg16", "VGG16", "vgg16", "caffe", 224,
               ("block5_pool", "block4_pool", "block5_conv3", "block3_pool"), "block4_pool",
               "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", 32, 15.5, 0.713),
        Family("vgg19", "VGG19", "vgg19", "caffe", 224, ("block5_pool", "block4_pool"),
               "block4_pool", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", 32, 19.6,
               0.713),
        Family("resnet50", "ResNet50", "resnet", "caffe", 224,
               ("conv5_block3_out", "conv4_block6_out"), "conv4_block6_out",
               "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 32, 4.1, 0.749),
        Family("resnet50v2", "ResNet50V2", "resnet_v2", "tf", 224,
               ("post_relu", "conv4_block6_out"), "conv4_block6_out",
               "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", 32, 4.1, 0.760),
        Family("inceptionv3", "InceptionV3", "inception_v3", "tf", 299, ("mixed10", "mixed8"),
               "mixed8", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 75, 5.7,
               0.779),
        Family("efficientnetv2b0", "EfficientNetV2B0", "efficientnet_v2", "built-in", 224,
               ("top_activation", "block5e_add"), "block5e_add", "efficientnetv2-b0_notop.h5",
               32, 0.7, 0.787),
        Family("convnext_tiny", "ConvNeXtTiny", "convnext", "built-in", 224,
               (OUTPUT, "convnext_tiny_downsampling_block_2"),
               "convnext_tiny_downsampling_block_2", "convnext_tiny_notop.h5", 32, 4.5, 0.813),
        Family("mobilenetv3large", "MobileNetV3Large", "mobilenet_v3", "built-in", 224,
               (OUTPUT, "expanded_conv_11_add"), "expanded_conv_11_add",
               "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", 32, 0.22, 0.756),
    )
}  # fmt: skip
IMAGENET_MD5 = {"vgg16": "6d6bbae143d832006294945121d1f1fc"}  # the file_hash Keras checks
IMAGENET_NOTOP = FAMILIES["vgg16"].imagenet_file


def family(name: str) -> Family:
    """The registered backbone called `name`; an unknown name lists the valid ones."""
    if name not in FAMILIES:
        raise UserError(f"BACKBONE must be one of {', '.join(FAMILIES)}; got '{name}'")
    return FAMILIES[name]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content (weights files are large: read a block at a time)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines the backbone's output for a given input image.

    `layer` and `input_size` default to the backbone's own (last feature stage, native size).
    """

    weights: str = "imagenet"
    layer: str | None = None
    input_size: int | None = None
    seed: int = 0
    name: str = "vgg16"
    precision: str = "float32"  # or "auto": resolved here, for this machine (see resolve)

    def __post_init__(self) -> None:
        fam = family(self.name)
        if self.precision == AUTO:  # before anything is hashed: settings() never says "auto"
            chosen, why = resolve(AUTO)
            object.__setattr__(self, "precision", chosen)
            object.__setattr__(self, "precision_reason", why)
        if self.layer is None:
            object.__setattr__(self, "layer", fam.layers[0])
        if self.input_size is None:
            object.__setattr__(self, "input_size", fam.default_size)
        if self.layer not in fam.layers:
            raise UserError(
                f"LAYER must be one of {', '.join(fam.layers)} for BACKBONE={self.name}; "
                f"got '{self.layer}'"
            )
        if not isinstance(self.input_size, int) or self.input_size < fam.min_size:
            raise UserError(
                f"SIZE must be an integer of at least {fam.min_size} for BACKBONE={self.name}; "
                f"got {self.input_size!r}"
            )
        if self.precision not in PRECISIONS:
            raise UserError(
                f"PRECISION must be one of {AUTO}, {', '.join(PRECISIONS)}; got '{self.precision}'"
            )
        kind = self.weights_kind
        if kind == "file" and not Path(self.weights).is_file():
            raise UserError(
                f"WEIGHTS file '{self.weights}' does not exist; pass WEIGHTS=/path/to/"
                f"{fam.imagenet_file} (or imagenet / none)"
            )

    @property
    def family(self) -> Family:
        return family(self.name)

    def describe(self) -> str:
        """`vgg16 block5_pool 224px, precision mixed_bfloat16 (auto: this CPU has avx512_bf16)`."""
        why = getattr(self, "precision_reason", "")
        return f"{self.name} {self.layer} {self.input_size}px, precision {self.precision}" + (
            f" ({why})" if why else ""
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
            fam = self.family
            md5 = IMAGENET_MD5.get(fam.name)
            return f"imagenet:{fam.imagenet_file}" + (f":md5={md5}" if md5 else "")
        if kind == "none":
            return f"random:seed={self.seed}:{RANDOM_INIT}"
        return f"file:sha256={file_sha256(self.weights)}"

    def settings(self) -> dict[str, Any]:
        """The settings that enter the cache key (weights by identity, not by path)."""
        d = asdict(self)
        d.pop("weights")  # a path or a spelling ('ImageNet'): the identity below is what counts
        d["weights_id"] = self.weights_id()
        fam = self.family
        d["preprocessing"] = (
            f"keras.applications.{fam.module}.preprocess_input: {PREPROCESSING[fam.preprocessing]}"
        )
        if not self.random_weights:
            d.pop("seed")  # the seed only matters for random weights
        return d


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The processor's feature flags as Linux lists them (x86: `flags`); empty elsewhere."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def visible_gpu() -> dict[str, Any] | None:
    """TensorFlow's details of the first GPU it can use ({"device_name", "compute_capability"}).

    Cheap where there is no NVIDIA driver (no /proc/driver/nvidia, no /dev/nvidia0, or
    CUDA_VISIBLE_DEVICES empty or -1): TensorFlow is not imported to say "none". Where there is
    one, TensorFlow, which will run the backbone anyway, says whether it can use it.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    driver = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
    if not driver and "tensorflow" not in sys.modules:
        return None
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return None
    from pipeline.progress import quiet_frameworks

    quiet_frameworks()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = dict(tf.config.experimental.get_device_details(gpus[0]))
    details.setdefault("device_name", gpus[0].name)
    return details


@functools.lru_cache(maxsize=1)
def _this_machine() -> tuple[frozenset[str], dict[str, Any] | None]:
    return cpu_flags(), visible_gpu()


def choose_precision(flags: Iterable[str], gpu: dict[str, Any] | None) -> tuple[str, str]:
    """What `auto` means on a machine with these CPU flags and this GPU: (precision, why).

    A GPU decides when there is one: bfloat16 from compute capability 8.0 (Ampere and later),
    float16 on 7.x (tensor cores, float16 only), float32 below (no tensor cores: no gain). Else
    bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), float32 everywhere else
    (emulated bfloat16 is slower than float32).
    """
    if gpu is not None:
        cc = tuple(int(v) for v in gpu.get("compute_capability") or (0, 0))
        name = gpu.get("device_name") or "GPU"
        where = f"auto: {name}, compute capability {cc[0]}.{cc[1]}"
        if cc >= (8, 0):
            return "mixed_bfloat16", where
        if cc >= (7, 0):
            return "mixed_float16", where
        return "float32", where + ", no tensor cores"
    have = [f for f in BF16_CPU_FLAGS if f in set(flags)]
    if have:
        return "mixed_bfloat16", f"auto: this CPU has {have[0]}"
    return "float32", "auto: no GPU, and no native bfloat16 in this CPU: no avx512_bf16, no AMX"


def resolve(
    requested: str, flags: Iterable[str] | None = None, gpu: dict[str, Any] | None = None
) -> tuple[str, str]:
    """(concrete precision, why) for PRECISION=`requested`; see `resolve_precision`."""
    if requested != AUTO:
        return requested, ""
    if flags is None and gpu is None:
        flags, gpu = _this_machine()
    return choose_precision(flags or (), gpu)


def resolve_precision(
    requested: str, cpu_flags: Iterable[str] | None = None, gpu: dict[str, Any] | None = None
) -> str:
    """The concrete precision PRECISION=`requested` means: `auto` is chosen for a machine.

    `cpu_flags` (/proc/cpuinfo's names) and `gpu` (TensorFlow's device details, with
    `compute_capability`) describe the machine; pass either (the other then means none) to
    describe another one; neither: this one. Any other value is returned as it is.
    """
    return resolve(requested, cpu_flags, gpu)[0]


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


RANDOM_INIT = "numpy-glorot-uniform-v2"


def seeded_init(model: Any, seed: int) -> None:
    """Glorot-uniform kernels from NumPy, seeded: the same in every process.

    Vectors (biases, normalisation scales and statistics) keep Keras' constant initial values.

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
            else:  # biases, BatchNorm/LayerNorm scales and statistics: Keras' constant values
                new.append(w)
        if new:
            layer.set_weights(new)


def _keras() -> Any:
    """Keras, with TensorFlow's start-up lines held back (pipeline.progress.quiet_frameworks)."""
    from pipeline.progress import quiet_frameworks

    quiet_frameworks()
    import keras

    return keras


def _constructor(fam: Family) -> Any:
    keras = _keras()

    return getattr(keras.applications, fam.constructor)


def _bare(fam: Family, size: int, weights: str | None) -> Any:
    kw: dict[str, Any] = {}
    if fam.preprocessing == "built-in":
        kw["include_preprocessing"] = True
    return _constructor(fam)(weights=weights, include_top=False, input_shape=(size, size, 3), **kw)


def _load_strictly(model: Any, path: str) -> None:
    """`load_weights`, where Keras' "skipping ... keeps freshly-initialized weights" is an error.

    A file of another architecture could otherwise load in part, with a warning, and leave the
    rest of the network random: never accepted silently.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.load_weights(path)


def identify_weights(path: str, size: int = 64) -> str | None:
    """Which registered backbone a no-top weights file loads into (None: none of them)."""
    for name, fam in FAMILIES.items():
        try:
            _load_strictly(_bare(fam, max(size, fam.min_size), None), path)
            return name
        except Exception:  # noqa: BLE001, S112 - any failure means "not this one"
            continue
    return None


def _load_base(spec: BackboneSpec) -> Any:
    fam = spec.family
    kind = spec.weights_kind
    if kind == "none":
        model = _bare(fam, spec.input_size, None)
        seeded_init(model, spec.seed)
        return model
    if kind == "imagenet":
        try:
            return _bare(fam, spec.input_size, "imagenet")
        except Exception as e:  # Keras raises a bare Exception on a failed download
            raise UserError(
                f"could not download the ImageNet {fam.constructor} weights (offline?): "
                f"{str(e).splitlines()[0][:160]}; download {fam.imagenet_file} where you have "
                "internet and pass WEIGHTS=/path/to/notop.h5"
            ) from None
    model = _bare(fam, spec.input_size, None)
    try:
        _load_strictly(model, spec.weights)
    except Exception as e:
        other = identify_weights(spec.weights)
        if other is not None and other != fam.name:
            raise UserError(
                f"WEIGHTS file '{spec.weights}' holds {other} weights, and BACKBONE={fam.name}; "
                f"pass BACKBONE={other}, or a {fam.name} no-top weights file such as "
                f"{fam.imagenet_file}"
            ) from None
        raise UserError(
            f"WEIGHTS file '{spec.weights}' could not be loaded into {fam.constructor} without "
            f"its top ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            f"pass a {fam.name} no-top weights file such as {fam.imagenet_file}"
        ) from None
    return model


def cut(base: Any, layer: str) -> Any:
    """The output tensor of `layer` in `base` (OUTPUT: the model's own output)."""
    return base.output if layer == OUTPUT else base.get_layer(layer).output


def build(spec: BackboneSpec) -> Any:
    """The frozen backbone, cut at `spec.layer`, as a Keras model taking preprocessed float32."""
    keras = _keras()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(spec.precision)
    try:
        base = _load_base(spec)
    finally:
        keras.config.set_dtype_policy(previous)
    model = keras.Model(base.input, cut(base, spec.layer), name=f"{spec.name}_{spec.layer}")
    model.trainable = False
    return model


def preprocess(batch: np.ndarray, name: str = "vgg16") -> np.ndarray:
    """The backbone's own preprocessing on a uint8 RGB batch (caffe, [-1, 1], or none).

    Built-in families (EfficientNetV2, ConvNeXt, MobileNetV3) take 0-255 RGB: their
    `preprocess_input` is the identity and the model rescales inside.
    """
    import importlib

    _keras()
    mod = importlib.import_module(f"keras.applications.{family(name).module}")
    return np.asarray(mod.preprocess_input(batch.astype(np.float32)), dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _shape(name: str, layer: str, size: int) -> tuple[int, ...]:
    base = _bare(family(name), size, None)
    return tuple(int(v) for v in cut(base, layer).shape[1:])


def output_shape(spec: BackboneSpec) -> tuple[int, ...]:
    """Shape of one image's features at `spec.layer`, read from the model itself."""
    return _shape(spec.name, spec.layer, spec.input_size)

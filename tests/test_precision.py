"""PRECISION=auto: the choice per processor, its place in the cache key, bfloat16's accuracy cost;
and a quiet terminal (no framework line on stderr, nothing at all from the library's log=None)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, pattern

import pipeline
from pipeline import backbone, store
from pipeline.backbone import PRECISIONS, BackboneSpec, resolve_precision
from pipeline.cache_identity import cache_settings

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "flags, gpu, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, None, "mixed_bfloat16"),  # Zen 4, Cooper Lake
        ({"avx2", "amx_bf16", "amx_tile", "amx_int8"}, None, "mixed_bfloat16"),  # Sapphire Rapids
        ({"avx2", "fma", "avx512f"}, None, "float32"),  # AVX-512 without bf16: emulated, slower
        ({"sse4_2", "avx2", "fma"}, None, "float32"),
        (set(), None, "float32"),  # not x86, or no /proc/cpuinfo
        (set(), {"device_name": "NVIDIA H200", "compute_capability": (9, 0)}, "mixed_bfloat16"),
        ({"avx512_bf16"}, {"compute_capability": (7, 5)}, "mixed_float16"),  # T4: the GPU decides
        (set(), {"compute_capability": (8, 0)}, "mixed_bfloat16"),
        (set(), {"compute_capability": (6, 1)}, "float32"),  # no tensor cores: nothing to gain
    ],
)
def test_auto_precision_per_processor(flags, gpu, expected):
    assert resolve_precision("auto", cpu_flags=flags, gpu=gpu) == expected
    assert resolve_precision("float32", cpu_flags=flags, gpu=gpu) == "float32"  # asked: kept


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert backbone.cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert backbone.cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_is_resolved_before_hashing_and_precision_is_in_the_key(spec):
    here = resolve_precision("auto")
    auto = BackboneSpec("none", input_size=SIZE, precision="auto")
    assert auto.precision == here in PRECISIONS
    assert "auto" not in str(cache_settings(auto, "float16"))
    assert store.cache_key(cache_settings(auto, "float16")) == store.cache_key(
        cache_settings(BackboneSpec("none", input_size=SIZE, precision=here), "float16")
    )
    specs = [BackboneSpec("none", input_size=SIZE, precision=p) for p in PRECISIONS]
    keys = {store.cache_key(cache_settings(s, "float16")) for s in specs}
    assert len(keys) == 3
    with pytest.raises(pipeline.errors.UserError, match="PRECISION must be one of auto, float32"):
        BackboneSpec("none", input_size=SIZE, precision="bfloat16")


def test_auto_is_the_default_everywhere():
    for fn in (pipeline.extract, pipeline.finetune, pipeline.sweep):
        assert inspect.signature(fn).parameters["precision"].default == "auto", fn
    from pipeline.cli import parser

    for cmd in ("features", "finetune", "sweep"):
        assert parser().parse_args([cmd]).precision == "auto"
    assert re.search(r"^PRECISION \?= auto$", (ROOT / "Makefile").read_text(), flags=re.M)


def test_auto_on_a_bfloat16_cpu_names_it_first_and_predict_takes_its_cache(tmp_path, monkeypatch):
    """On a (faked) AVX512-BF16 processor: the run says so first, the cache, the run and the
    report carry mixed_bfloat16, and predict (which recomputes the key) accepts the cache."""
    monkeypatch.setattr(backbone, "_this_machine", lambda: (frozenset({"avx512_bf16"}), None))
    data = make_dataset(tmp_path / "data", per_class=4, n_classes=2)
    lines: list[str] = []
    s = pipeline.extract(data, tmp_path / "art", weights="none", size=SIZE, log=lines.append)
    assert lines[0] == (
        f"vgg16 block5_pool {SIZE}px, precision mixed_bfloat16 (auto: this CPU has avx512_bf16)"
    )
    assert store.read_index(s.cache).attrs["settings"]["precision"] == "mixed_bfloat16"
    r = pipeline.train_head(tmp_path / "art", folds=2, log=None)
    assert r["features"]["settings"]["precision"] == "mixed_bfloat16"
    rows = pipeline.predict(data / "train/class_1", tmp_path / "art", log=None)
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    rep = pipeline.report(tmp_path / "art", log=None)
    assert rep["header"]["precision"] == "mixed_bfloat16"


def test_bfloat16_features_stay_close_to_float32_ones():
    """Measured (VGG16, seeded random weights, 32 and 64 px, these images): per-image
    correlation of the pooled vectors >= 0.99993, relative error 0.4-0.6 %. Stated: 0.999, 2 %."""
    from PIL import Image

    rng = np.random.default_rng(0)
    size = 64
    imgs = np.stack(
        [
            np.asarray(Image.fromarray(pattern(i % 3, rng)).resize((size, size), Image.BILINEAR))
            for i in range(9)
        ]
    )
    x = backbone.preprocess(imgs)
    import keras

    pooled = {}
    for p, compute in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
        model = backbone.build(BackboneSpec("none", input_size=size, precision=p))
        # bfloat16 itself computes (not float16, nor float32): each layer, and its output
        weighted = [layer for layer in model.layers if layer.weights]
        assert len(weighted) == 13  # VGG16's convolutions up to block5_pool
        for layer in model.layers:
            assert layer.compute_dtype == compute, (layer.name, layer.compute_dtype)
        assert {w.dtype for layer in weighted for w in layer.weights} == {"float32"}  # mixed
        out = model.predict_on_batch(x)
        assert str(out.dtype) == compute
        maps = np.asarray(out, np.float32)
        if compute == "bfloat16":  # a bfloat16 is a float32 with its low 16 bits zero
            assert not (maps.view(np.uint32) & 0xFFFF).any()
        pooled[p] = maps.mean(axis=(1, 2))
    assert keras.config.dtype_policy().name == "float32"  # the build put the policy back
    a, b = pooled["float32"], pooled["mixed_bfloat16"]
    assert not np.array_equal(a, b)  # bfloat16 did compute
    corr = [np.corrcoef(u, v)[0, 1] for u, v in zip(a, b, strict=True)]
    assert min(corr) > 0.999, corr
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.02


FRAMEWORK = re.compile(
    r"oneDNN|onednn|cuInit|cuda|CUDA|absl|tensorflow/|[IWEF]\d{4} |cpu_feature_guard|TensorRT|"
    r"XLA|rebuild TensorFlow|WARNING: All log"
)


def test_no_framework_line_on_stderr(tmp_path):
    """`python -m pipeline features` on a tiny dataset: stderr holds progress lines only, and
    the first line of stdout says what computes the features."""
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    ours = ("TF_CPP_MIN_LOG_LEVEL", "PIPELINE_VERBOSE")  # the defaults, not the test's settings
    env = {k: v for k, v in os.environ.items() if k not in ours}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", "features", "--data", str(data),
         "--artifacts", str(tmp_path / "art"), "--weights", "none", "--size", str(SIZE)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    said = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert not [ln for ln in said if FRAMEWORK.search(ln)], p.stderr
    assert all(re.match(r"embedding \d+/\d+ \(", ln) for ln in said), p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith(f"vgg16 block5_pool {SIZE}px, precision {resolve_precision('auto')} (")


def test_the_library_with_log_none_prints_nothing(tmp_path, capfd):
    data = make_dataset(tmp_path / "data", per_class=4, n_classes=2)
    capfd.readouterr()
    pipeline.extract(data, tmp_path / "art", weights="none", size=SIZE, log=None)
    pipeline.train_head(tmp_path / "art", folds=2, log=None)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    lines: list[str] = []  # and with a log, the progress lines are the log's
    pipeline.extract(data, tmp_path / "art", weights="none", size=SIZE, rebuild=True,
                     log=lines.append)  # fmt: skip
    assert any(re.match(r"embedding 8/8 \(100\.0%\)", ln) for ln in lines), lines
    assert capfd.readouterr() == ("", "")

"""The arithmetic segmentation networks serve in (brainscan.models.precision, load_bundle's ``precision``):
which CPUs get bfloat16, that a bfloat16 network is the same network with the same masks, and that the
setting reaches the worker, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainscan.models.precision import PRECISIONS, cpu_has_bf16, dtype_policy, resolve_precision
from tests.paths import REPO_ROOT

DEMO_SEGMENTER = REPO_ROOT / "models" / "segmentation" / "unet3d" / "demo-1"
CLASSIFIER = REPO_ROOT / "models" / "classification" / "resnet50" / "1.1"

ZEN4_FLAGS = "fpu vme sse4_2 avx2 avx512f avx512_vnni avx512_bf16 clzero"
ZEN2_FLAGS = "fpu vme sse4_2 avx2 fma clzero"


def _cpuinfo(tmp_path: Path, flags: str | None) -> Path:
    path = tmp_path / "cpuinfo"
    lines = ["processor\t: 0", "model name\t: AMD EPYC"] + ([f"flags\t\t: {flags}"] if flags is not None else [])
    path.write_text("\n".join(lines) + "\n\n")
    return path


@pytest.mark.parametrize("flags, native", [
    (ZEN4_FLAGS, True),
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids: AMX
    (ZEN2_FLAGS, False),
    ("fpu avx2 avx512f avx512_bf16x", False),  # a flag is a whole word
    (None, False),  # no flags line (another architecture)
])
def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = _cpuinfo(tmp_path, flags)
    assert cpu_has_bf16(cpuinfo) is native
    assert resolve_precision("auto", cpuinfo) == ("bfloat16" if native else "float32")
    assert resolve_precision(None, cpuinfo) == resolve_precision("auto", cpuinfo)
    for explicit in ("float32", "bfloat16"):  # an explicit choice wins over the CPU
        assert resolve_precision(explicit, cpuinfo) == explicit


def test_an_unreadable_cpuinfo_means_float32(tmp_path):
    assert cpu_has_bf16(tmp_path / "missing") is False
    assert resolve_precision("auto", tmp_path / "missing") == "float32"


@pytest.mark.parametrize("bad", ["fp16", "bf16", "", "AUTO"])
def test_an_unknown_precision_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(bad)
    with pytest.raises(ValueError):
        dtype_policy(bad)
    assert set(PRECISIONS) == {"auto", "float32", "bfloat16"}


def test_a_bfloat16_segmenter_is_the_same_network_with_the_same_masks(tmp_path):
    """Forced bfloat16 (emulated where the CPU lacks it): bfloat16 compute, float32 weights and
    probabilities, the global dtype policy untouched, and the trained demo network's mask on a phantom
    case matches float32's (bfloat16 keeps 8 bits of mantissa: probabilities move by a few hundredths)."""
    import keras

    from brainscan.data.brats import find_case, load_case
    from brainscan.data.phantoms import write_brats_phantoms
    from brainscan.inference.segmenter import segment_case
    from brainscan.metrics.segmentation import dice
    from brainscan.models.bundle import load_bundle

    before = keras.mixed_precision.global_policy().name
    full = load_bundle(DEMO_SEGMENTER, precision="float32")
    half = load_bundle(DEMO_SEGMENTER, precision="bfloat16")
    assert keras.mixed_precision.global_policy().name == before
    assert (full.precision, half.precision) == ("float32", "bfloat16")
    convs = [layer for layer in half.model.layers if type(layer).__name__ == "Conv3D"]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(w.dtype == "float32" for w in half.model.weights)
    for a, b in zip(full.model.get_weights(), half.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    window = np.random.default_rng(0).normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
    p_full, p_half = np.asarray(full.model(window)), np.asarray(half.model(window))
    assert p_half.dtype == np.float32
    # A few hundredths for 99 % of the values; near a decision boundary a voxel moves more (0.14 on the
    # AVX2-only CPU that emulates bfloat16, where its 99.9th percentile is 0.054), never by half.
    moved = np.abs(p_full - p_half)
    assert moved.mean() < 0.01 and np.quantile(moved, 0.99) < 0.05 and moved.max() < 0.3
    assert moved.max() > 0, "bfloat16 compute must differ somewhere from float32"

    case = write_brats_phantoms(tmp_path, n=1, seed=5, shape=(96, 96, 64))[0]
    loaded = load_case(find_case(case), with_seg=False)
    mask_full, mask_half = segment_case(full, loaded), segment_case(half, loaded)
    assert (mask_full > 0).sum() > 1000, "the demo network must find the phantom's tumour for this to mean anything"
    assert dice(mask_full > 0, mask_half > 0) > 0.98
    assert np.mean(mask_full == mask_half) > 0.995


def test_auto_gives_segmenters_the_cpus_choice_and_classifiers_float32():
    from brainscan.models.bundle import load_bundle

    assert load_bundle(DEMO_SEGMENTER).precision == resolve_precision("auto")
    assert load_bundle(CLASSIFIER).precision == "float32"


def test_the_segmenter_settings_check_the_precision(monkeypatch):
    from pydantic import ValidationError

    from services.segmenter.settings import Settings

    monkeypatch.setenv("BRAINSCAN_ENV", "development")
    assert Settings().precision == "auto"
    monkeypatch.setenv("SEGMENTER_PRECISION", "BFloat16")
    assert Settings().precision == "bfloat16"
    monkeypatch.setenv("SEGMENTER_PRECISION", "fp8")
    with pytest.raises(ValidationError, match="precision must be one of"):
        Settings()


def test_predict_and_evaluate_report_and_honour_the_precision(tmp_path, capsys):
    from brainscan.cli.main import main
    from brainscan.data.phantoms import write_brats_phantoms

    case = write_brats_phantoms(tmp_path / "cases", n=1, seed=1, shape=(64, 64, 48))[0]
    for precision in ("float32", "bfloat16"):
        assert main(["predict", "segment", str(DEMO_SEGMENTER), str(case), "--out", str(tmp_path / f"{precision}.nii.gz"),
                     "--precision", precision, "--json", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["precision"] == precision
    assert main(["evaluate", str(DEMO_SEGMENTER), str(case.parent), "--out", str(tmp_path / "report"),
                 "--precision", "bfloat16", "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["bundle"]["precision"] == "bfloat16"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "segment", str(DEMO_SEGMENTER), str(case), "--out", str(tmp_path / "x.nii.gz"),
              "--precision", "half"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err

"""oneDNN is on wherever brainscan runs TensorFlow, unless the environment turns it off.

TensorFlow enables its oneDNN kernels by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; on AVX2-only
CPUs the U-Nets' Conv3D ran 3-5x slower without them (``bench/onednn.py``). ``import brainscan`` sets
``TF_ENABLE_ONEDNN_OPTS=1`` as a default, before TensorFlow loads, on every path that reaches TensorFlow
(the core's models, ``training``, the services). Each case runs in a fresh interpreter, since TensorFlow
reads the variable once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import {module}
from tensorflow.python.util import _pywrap_util_port
print("onednn", _pywrap_util_port.IsMklEnabled())
"""


def _onednn_after_importing(module: str, setting: str | None) -> bool:
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    if "_pywrap_util_port" in done.stderr and "ImportError" in done.stderr:
        pytest.skip("this TensorFlow build has no _pywrap_util_port.IsMklEnabled to ask")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("onednn ")]
    return lines[-1] == "onednn True"


def test_training_which_imports_keras_first_still_runs_with_onednn() -> None:
    # training.losses imports keras at its top; the package's __init__ imports brainscan before it
    assert _onednn_after_importing("training.losses", None)


def test_an_explicit_off_in_the_environment_is_kept() -> None:
    assert not _onednn_after_importing("brainscan.models.unet3d", "0")

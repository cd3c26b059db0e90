"""``import brainscan`` declines TensorFlow's and Keras' optional imports of JAX, pandas, scikit-learn and matplotlib.

The finder's rule is tested on a throwaway package (no TensorFlow); the whole effect once, in a fresh interpreter
that imports the classifier service's predictor as a service process does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainscan import lean_imports

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """An importable package ``lean_probe_lib`` that nothing has imported yet, declined for ``lean_probe.declined.``."""
    (tmp_path / "lean_probe_lib").mkdir()
    (tmp_path / "lean_probe_lib" / "__init__.py").write_text("VALUE = 42\n")
    # an unlisted helper module that imports the library at its module level
    (tmp_path / "lean_probe_helper.py").write_text("import lean_probe_lib\nVALUE = lean_probe_lib.VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(lean_imports.DECLINED, "lean_probe_lib", ("lean_probe.declined.",))
    monkeypatch.delitem(sys.modules, "lean_probe_lib", raising=False)
    monkeypatch.delitem(sys.modules, "lean_probe_helper", raising=False)
    finder = lean_imports.DeclineOptionalImports()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    yield
    sys.modules.pop("lean_probe_lib", None)
    sys.modules.pop("lean_probe_helper", None)


_OPTIONAL_IMPORT = """
try:
    import lean_probe_lib
    found = lean_probe_lib.VALUE
except ImportError as error:
    found = error
"""


_OPTIONAL_IMPORT_MODULE = """
import importlib
try:
    found = importlib.import_module("lean_probe_lib").VALUE
except ImportError as error:
    found = error
"""

_IMPORT_AT_CALL_TIME = """
def load():
    import lean_probe_lib
    return lean_probe_lib.VALUE

found = load()
"""

_THROUGH_A_HELPER = """
import lean_probe_helper
found = lean_probe_helper.VALUE
"""


def _import_from(module_name: str, source: str = _OPTIONAL_IMPORT):
    """Run ``source`` as the module-level code of a module called ``module_name``; its ``found``."""
    namespace = {"__name__": module_name}
    exec(compile(source, f"<{module_name}>", "exec"), namespace)
    return namespace["found"]


def test_a_listed_module_gets_import_error_and_any_other_module_gets_the_library(probe_package) -> None:
    declined = _import_from("lean_probe.declined.optional")
    assert isinstance(declined, ImportError)
    assert declined.name == "lean_probe_lib"
    assert "lean_probe.declined.optional" in str(declined)
    assert "lean_probe_lib" not in sys.modules
    # the same library for anyone else, and the earlier refusal left nothing behind
    assert _import_from("brainscan.metrics.something") == 42
    assert _import_from("lean_probe.declined_not_a_prefix") == 42
    # once imported it is not looked up again: the listed module gets it too
    assert _import_from("lean_probe.declined.optional") == 42


def test_importlib_import_module_from_a_listed_module_is_declined(probe_package) -> None:
    declined = _import_from("lean_probe.declined.optional", _OPTIONAL_IMPORT_MODULE)
    assert isinstance(declined, ImportError)
    assert "lean_probe_lib" not in sys.modules


def test_a_listed_modules_function_imports_the_library_at_call_time(probe_package) -> None:
    # only module-level (import-time) imports are optional feature probes; a call asks for the library
    assert _import_from("lean_probe.declined.optional", _IMPORT_AT_CALL_TIME) == 42


def test_an_unlisted_helper_imported_by_a_listed_module_gets_the_library(probe_package) -> None:
    # the importer is the first frame outside importlib: the helper, not the listed module above it
    assert _import_from("lean_probe.declined.optional", _THROUGH_A_HELPER) == 42


def test_importlib_look_alikes_are_not_taken_for_the_import_machinery() -> None:
    assert lean_imports._is_import_machinery("importlib")
    assert lean_imports._is_import_machinery("importlib._bootstrap")
    assert lean_imports._is_import_machinery("_frozen_importlib_external")
    assert not lean_imports._is_import_machinery("importlib_resources")
    assert not lean_imports._is_import_machinery("importlib_metadata.compat")


def test_install_adds_the_finder_once_and_the_environment_turns_it_off(monkeypatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not isinstance(f, lean_imports.DeclineOptionalImports)])
    monkeypatch.setenv(lean_imports.SWITCH, "0")
    assert lean_imports.install() is False
    assert not any(isinstance(f, lean_imports.DeclineOptionalImports) for f in sys.meta_path)
    monkeypatch.delenv(lean_imports.SWITCH)
    assert lean_imports.install() is True
    assert lean_imports.install() is True
    assert sum(isinstance(f, lean_imports.DeclineOptionalImports) for f in sys.meta_path) == 1
    assert isinstance(sys.meta_path[0], lean_imports.DeclineOptionalImports)


_SERVICE_PROCESS = """
import json, sys
import brainscan.metrics, training.segmenter  # brainscan's metrics import scikit-learn only when they need it
lazy = "sklearn" not in sys.modules
import services.classifier.predictor  # what the classifier service imports
import numpy as np, keras, tensorflow as tf
skipped = sorted(name for name in ("jax", "pandas", "sklearn", "matplotlib") if name in sys.modules)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
history = model.fit(np.ones((8, 4), "float32"), np.zeros((8, 2), "float32"), epochs=1, verbose=0)
import sklearn.metrics, pandas, matplotlib  # brainscan's own and nilearn's imports still work afterwards
print(json.dumps({"imported": skipped, "lazy": lazy, "loss": history.history["loss"][0],
                  "f1": sklearn.metrics.f1_score([0, 1], [0, 1])}))
"""


def test_a_service_process_loads_tensorflow_without_the_optional_libraries() -> None:
    env = {key: value for key, value in os.environ.items() if key != lean_imports.SWITCH}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run([sys.executable, "-c", _SERVICE_PROCESS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == [], "TensorFlow or Keras imported an optional library brainscan declines"
    assert report["lazy"], "importing brainscan.metrics or training.segmenter imported scikit-learn"
    assert report["loss"] >= 0.0
    assert report["f1"] == 1.0

"""Keep TensorFlow and Keras from importing optional libraries that brainscan never asks them for.

``import tensorflow`` (which loads Keras 3 through ``tf.keras``) tries optional imports at start-up, each guarded
by ``try: ... except ImportError``, for features brainscan does not use:

=============================================  ==========  =====================================================
importing modules (prefix)                     library     for
=============================================  ==========  =====================================================
``tensorflow.lite.``                           jax         converting JAX functions to TF Lite
``keras.src.callbacks.orbax_checkpoint``       jax         Orbax checkpoints (JAX's checkpoint library)
``keras.src.trainers.data_adapters.``          pandas      ``fit`` on DataFrames
``keras.src.wrappers.``                        sklearn     the scikit-learn estimator wrappers
``keras.src.visualization.``                   matplotlib  plotting image galleries and bounding boxes
=============================================  ==========  =====================================================

Where those libraries are installed (scikit-learn and matplotlib are brainscan dependencies, pandas comes with
nilearn, JAX with the dev extra) they cost about 40 % of TensorFlow's import: measured with both cores busy,
``import brainscan, tensorflow`` went from 14.5 to 8 CPU-seconds and from 880 to 636 MB of RSS, for every
worker, service and CLI start and every test process. :func:`install` adds a finder that answers
``ImportError`` to exactly those imports when module-level code of exactly those modules makes them (directly
or through ``importlib.import_module``), so each library takes its ``except ImportError`` branch. The same
library imported from anywhere else (brainscan's metrics import scikit-learn, nilearn imports pandas, Keras'
JAX backend imports JAX), or from a function of a listed module at call time, is found as usual; once a
library is in ``sys.modules`` its top-level package is not looked up again (its submodules still are).

The Keras and TensorFlow features behind those imports stay off for the whole process, even when the library
is imported later, because each module decided at its own import. ``BRAINSCAN_LEAN_IMPORTS=0`` in the
environment turns the finder off.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

#: top-level package -> name prefixes of the modules whose optional import of it is declined
DECLINED: dict[str, tuple[str, ...]] = {
    "jax": ("tensorflow.lite.", "keras.src.callbacks.orbax_checkpoint"),
    "pandas": ("keras.src.trainers.data_adapters.",),
    "sklearn": ("keras.src.wrappers.",),
    "matplotlib": ("keras.src.visualization.",),
}

#: the environment variable that turns the finder off ("0")
SWITCH = "BRAINSCAN_LEAN_IMPORTS"

# frames between find_spec and the module that wrote the import statement (importlib's own frames)
_MAX_DEPTH = 12


class DeclineOptionalImports(MetaPathFinder):
    """A meta-path finder that raises ``ImportError`` for ``DECLINED`` imports made by their listed modules."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - the finder protocol's name
        importers = DECLINED.get(fullname.partition(".")[0])
        if importers is None:
            return None
        frame = sys._getframe(1)
        for _ in range(_MAX_DEPTH):
            if frame is None:
                break
            name = frame.f_globals.get("__name__") or ""
            if not _is_import_machinery(name):
                # the first frame outside the import machinery is the importer
                if name.startswith(importers) and frame.f_code.co_name == "<module>":
                    raise ImportError(f"brainscan declines {name}'s optional import of {fullname} ({__name__})",
                                      name=fullname)
                return None
            frame = frame.f_back
        return None


def _is_import_machinery(module_name: str) -> bool:
    """True for importlib's own modules (not for look-alikes such as ``importlib_resources``)."""
    return (module_name in ("importlib", "_frozen_importlib", "_frozen_importlib_external")
            or module_name.startswith("importlib."))

def install() -> bool:
    """Put the finder first on ``sys.meta_path`` once; False when ``BRAINSCAN_LEAN_IMPORTS=0`` turns it off."""
    if os.environ.get(SWITCH, "1").strip() == "0":
        return False
    if not any(isinstance(finder, DeclineOptionalImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeclineOptionalImports())
    return True

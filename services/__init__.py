"""HTTP services of brainscan: ``classifier`` (2D slice classification) and ``segmenter`` (3D jobs).

Services load models only through :func:`brainscan.models.bundle.load_bundle` and preprocess only
through :mod:`brainscan.preprocess`, so serving matches training exactly.
"""

import brainscan  # noqa: F401  (its import sets the TensorFlow environment, oneDNN on, before TensorFlow loads)

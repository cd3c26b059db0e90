"""brainscan: brain MRI tumour classification and segmentation. Not for clinical use.

The core package holds everything that training and serving share: dataset readers, the one
preprocessing path, metrics, model architectures, model bundles and the model store.
"""

import os as _os

# TensorFlow switches its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX. On
# the AVX2-only CPUs of most laptops and many servers it falls back to Eigen: the U-Nets' Conv3D then runs
# about 4-5x slower, ResNet50's training step 2x (one AMD EPYC core without AVX-512; `python bench/onednn.py`
# measures it). Set here, before any module of
# brainscan, training or the services imports TensorFlow, so that the worker, `evaluate`, `predict`
# and training all get it; an explicit TF_ENABLE_ONEDNN_OPTS=0 in the environment still turns it off.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# TensorFlow and Keras import JAX, pandas, scikit-learn and matplotlib at start-up for features brainscan does not
# use (TF Lite's JAX converter, DataFrame inputs, scikit-learn wrappers, plotting): about 40 % of TensorFlow's
# import CPU time and 250 MB of every process that loads it. Declined here, before anything imports TensorFlow
# (brainscan/lean_imports.py; BRAINSCAN_LEAN_IMPORTS=0 turns it off).
from brainscan import lean_imports as _lean_imports  # noqa: E402

_lean_imports.install()

__version__ = "0.1.0"

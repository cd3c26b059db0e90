"""The environment of a ``KERAS_BACKEND=jax`` training subprocess in the tests (what a lent GPU machine
without TensorFlow runs, tried here on the CPU)."""

from __future__ import annotations

import os

from tests.paths import REPO_ROOT


def jax_cpu_env() -> dict[str, str]:
    """JAX on the CPU, with XLA's CPU optimisation passes off.

    Under JAX every weight initializer, the train step and the predict step are XLA programs compiled
    on first use. With the default optimisation, building the tiny 3D U-Net alone compiles 41 of them
    in 58 s on one core; at level 0 it takes 4 s. These runs check plumbing (the batches, the
    averages, a bundle TensorFlow serves), not speed, and the programs compute the same results.
    """
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT),
            "XLA_FLAGS": flags}

"""Test-session environment: development mode, no deployment secrets inherited from the shell, and
under pytest-xdist (``make test`` runs one worker per core) one core's worth of threads per worker.

``BRAINSCAN_ENV=development`` lets tests build the services in-process (``create_app(Settings(...))``)
without secrets; those apps then run without internal authentication. The servers that
tests/servers.py and tests/redis_server.py start get a token and a password all the same, so the
real stack is always tested with its trust boundary on (and a test of production mode sets
``BRAINSCAN_ENV=production`` itself). Perceptual hashes of images are cached for the run by content
(``BRAINSCAN_PHASH_CACHE``).

With workers, each worker (and every server it starts, which inherits its environment) gets the
machine's cores divided by the number of workers as TensorFlow/OpenMP threads, so that two workers
on two cores do not oversubscribe them. ``make test`` distributes whole files (``--dist loadfile``),
so a module's fixtures still run once; :func:`pytest_collection_modifyitems` puts the longest
files first, so that no worker is left alone with one of them at the end.
"""

from __future__ import annotations

import os

os.environ["BRAINSCAN_ENV"] = "development"
for _secret in ("BRAINSCAN_INTERNAL_TOKEN", "BRAINSCAN_REDIS_PASSWORD"):
    os.environ.pop(_secret, None)

# One perceptual-hash cache for the whole run (every xdist worker, and the CLI and servers they
# start): the real Kaggle images are hashed once, not once per test that splits them. Keyed by the
# bytes' sha256, so it cannot serve a stale hash. The controller sets it; workers inherit it.
if "BRAINSCAN_PHASH_CACHE" not in os.environ:
    import tempfile

    os.environ["BRAINSCAN_PHASH_CACHE"] = tempfile.mkdtemp(prefix="brainscan-phash-")

import brainscan  # noqa: F401  (sets TF_ENABLE_ONEDNN_OPTS before any test module imports TensorFlow)

if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    for _variable in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_variable, _threads)

#: The files that take longest (minutes each on 2 cores: model training, shipped-bundle evaluation,
#: real cases through the whole stack), longest first. Scheduled first, they overlap with the many
#: short files instead of ending the run on one worker.
LONG_FILES = (
    "tests/training/test_classifier_training.py",
    "tests/training/test_classifier_options.py",
    "tests/training/test_segmenter_training.py",
    "tests/training/test_ensemble.py",
    "tests/models/test_shipped_bundles.py",
    "tests/training/test_pack.py",
    "tests/reliability/test_load_and_faults.py",
    "tests/gateway/test_segmentations.py",
    "tests/gateway/test_dicom_segmentations.py",
    "tests/test_launcher.py",
    "tests/segmenter/test_worker_integration.py",
    "tests/dicom/test_predict_dicom.py",
)


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 (pytest hook)
    """Run the :data:`LONG_FILES` first (stable sort: the order inside a file is kept)."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}

    def key(item) -> int:  # noqa: ANN001
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank))

    items.sort(key=key)

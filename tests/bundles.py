"""Real model bundles for tests: tiny architectures, saved and promoted in a temporary model store.

The weights come from a seeded initialisation, not from training: API and browser tests need a
real bundle that loads and predicts through the real code path, not a good model. Tests that
check learning train their own.
"""

from __future__ import annotations

from pathlib import Path

from brainscan.labels import KAGGLE_CLASSES

TINY_INPUT_SIZE = 64


def make_classifier_store(root: Path, archs: tuple[str, ...] = ("resnet50", "vit_cnn"), *,
                          input_size: int = TINY_INPUT_SIZE, version: str = "test-1", seed: int = 0,
                          metrics: dict | None = None, inference: dict | None = None) -> Path:
    """Write a tiny bundle per architecture into ``root/classification/<arch>/<version>`` and promote it.

    Args:
        metrics: the manifests' ``metrics`` (default: a note that the bundle is untrained).
        inference: the manifests' ``inference`` section (e.g. ``{"tta": ["flip_lr"], "temperature": 2.0}``).

    Returns:
        ``root`` (usable as ``BRAINSCAN_MODELS``).
    """
    import keras

    from brainscan.models.bundle import save_bundle
    from brainscan.models.registry import build_model
    from brainscan.models.store import ModelStore
    from brainscan.preprocess.image2d import ImagePreprocessConfig

    store = ModelStore(root)
    for arch in archs:
        keras.utils.set_random_seed(seed)
        args = {"input_size": input_size, "num_classes": len(KAGGLE_CLASSES), "channels": 3, "preset": "tiny"}
        model = build_model(arch, args)
        save_bundle(
            model,
            root / "classification" / arch / version,
            task="classification",
            architecture=arch,
            architecture_args=args,
            preprocessing=ImagePreprocessConfig(input_size=input_size, channels=3),
            classes=list(KAGGLE_CLASSES),
            version=version,
            demo=True,
            metrics=metrics or {"note": "untrained test bundle"},
            training={"data_fingerprint": "none", "data_description": "untrained (seeded init) for tests",
                      "command": "tests/bundles.py", "epochs": 0, "seed": seed},
            inference=inference,
        )
        store.promote("classification", arch, version)
    return root

"""Tests of brainscan.evaluation; also the segmentation test bundle shared with tests/cli/test_predict_cli.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def make_segmenter_bundle(path: Path, *, patch_size: Sequence[int] = (32, 32, 32), overlap: float = 0.5,
                          version: str = "test-1", seed: int = 0, regions: bool = False,
                          postprocessing: dict | None = None, metrics: dict | None = None,
                          target_spacing: float = 2.0) -> Path:
    """Write a tiny, untrained (seeded) 3D U-Net segmentation bundle at ``path``.

    Plumbing tests need a real bundle that loads and predicts through the real code path, not a
    good model. ``divisor=8`` matches the tiny U-Net's 4 levels (3 poolings). ``regions=True``
    makes the shipped models' kind: sigmoid WT/TC/ET outputs at ``target_spacing`` mm (the shipped 2 mm
    unless told) in LPS voxel order.
    """
    import keras

    from brainscan.models.bundle import save_bundle
    from brainscan.models.registry import build_model
    from brainscan.preprocess.volume3d import VolumePreprocessConfig

    keras.utils.set_random_seed(seed)
    args: dict = {"preset": "tiny"}
    preprocessing = VolumePreprocessConfig(divisor=8)
    inference: dict = {"patch_size": list(patch_size), "overlap": overlap, "batch_size": 1}
    if regions:
        args.update(num_classes=3, output="sigmoid")
        preprocessing = VolumePreprocessConfig(divisor=8, target_spacing=target_spacing, orientation="LPS")
        inference.update(outputs="regions", postprocessing=postprocessing or {})
    return save_bundle(
        build_model("unet3d", args), path, task="segmentation", architecture="unet3d", architecture_args=args,
        preprocessing=preprocessing, version=version, demo=True,
        label_map={0: 0, 1: 1, 2: 2, 3: 4},
        inference=inference, metrics=metrics,
        training={"data_fingerprint": "none", "data_description": "untrained (seeded init) for tests",
                  "command": "tests/evaluation/__init__.py", "epochs": 0, "seed": seed},
    )

"""Deep supervision (``--deep-supervision N``): heads on the coarser decoder levels during training only; the
bundle serves the U-Net without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from brainscan.data.phantoms import write_brats_phantoms  # noqa: E402
from brainscan.errors import BrainscanError  # noqa: E402
from brainscan.models.registry import build_model  # noqa: E402
from training.deep_supervision import (  # noqa: E402
    head_losses,
    loss_weights,
    served_network,
    with_heads,
    with_target_copies,
)
from training.losses import DownsampledLoss, RegionDiceBCELoss  # noqa: E402
from training.segmenter import SegmenterTrainConfig, train_segmenter  # noqa: E402


@pytest.mark.parametrize("arch", ["unet3d", "attention_unet3d"])
def test_heads_predict_at_half_and_quarter_resolution_and_share_the_networks_weights(arch):
    network = build_model(arch, {"num_classes": 3, "output": "sigmoid", "preset": "tiny"})
    model = with_heads(network, 2)
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 16, 4)).astype("float32")
    full, half, quarter = (np.asarray(o) for o in model(x))
    assert full.shape == (1, 32, 32, 16, 3) and half.shape == (1, 16, 16, 8, 3) and quarter.shape == (1, 8, 8, 4, 3)
    assert 0.0 <= half.min() and half.max() <= 1.0  # the network's own activation (sigmoid regions)
    np.testing.assert_allclose(full, np.asarray(network(x)), atol=1e-6)
    served = served_network(model)
    assert len(served.outputs) == 1 and len(served.weights) == len(network.weights)
    assert [w.path for w in served.weights] == [w.path for w in network.weights]
    assert served_network(network) is network
    with pytest.raises(ValueError, match="no decoder level"):
        with_heads(network, 3)  # 4 levels: decoder levels 1 and 2 below full resolution, not 3


def test_a_head_loss_is_the_loss_on_block_averaged_targets():
    rng = np.random.default_rng(1)
    truth = (rng.random((2, 8, 8, 4, 3)) > 0.6).astype("float32")
    predicted = rng.random((2, 4, 4, 2, 3)).astype("float32")
    pooled = truth.reshape(2, 4, 2, 4, 2, 2, 2, 3).mean(axis=(2, 4, 6))
    base = RegionDiceBCELoss()
    expected = float(base(pooled, predicted))
    assert float(DownsampledLoss(base, 2)(truth, predicted)) == pytest.approx(expected, rel=1e-5)
    restored = DownsampledLoss.from_config(DownsampledLoss(base, 2).get_config())
    assert restored.factor == 2 and float(restored(truth, predicted)) == pytest.approx(expected, rel=1e-5)
    assert float(DownsampledLoss(base, 1)(pooled, predicted)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="power of 2"):
        DownsampledLoss(base, 3)
    assert loss_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert [getattr(loss, "factor", 1) for loss in head_losses(base, 2)] == [1, 2, 4]


def test_target_copies_for_tf_data_and_for_a_py_dataset():
    import tensorflow as tf

    x, y = np.zeros((2, 4), "float32"), np.ones((2, 3), "float32")
    (bx, by), = list(with_target_copies(tf.data.Dataset.from_tensors((x, y)), 3).as_numpy_iterator())
    assert len(by) == 3 and all(np.array_equal(t, y) for t in by) and np.array_equal(bx, x)

    class Batches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, number: int):
            return x + number, y

    copies = with_target_copies(Batches(workers=1), 2)
    assert isinstance(copies, keras.utils.PyDataset) and len(copies) == 5
    bx, by = copies[3]
    assert np.array_equal(bx, x + 3) and len(by) == 2 and np.array_equal(by[1], y)


@pytest.mark.parametrize("value", [-1, 3])
def test_config_refuses_more_heads_than_decoder_levels(value, tmp_path):
    with pytest.raises(ValueError, match="deep_supervision"):
        SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny", deep_supervision=value)


def test_a_deep_supervision_run_checkpoints_the_heads_and_ships_the_network_without_them(tmp_path, monkeypatch):
    from brainscan.models.bundle import load_bundle
    from training.runtime import load_checkpoint

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    step = TensorFlowTrainer.train_step
    monkeypatch.setattr(TensorFlowTrainer, "train_step", lambda self, data: traces.append(1) or step(self, data))
    data = tmp_path / "brats"
    write_brats_phantoms(data, n=4, seed=0, shape=(64, 64, 48))
    bundle_path = train_segmenter(SegmenterTrainConfig(
        data=data, arch="attention_unet3d", out=tmp_path / "models", preset="tiny", patch_size=24, epochs=2,
        steps_per_epoch=3, val_cases=1, val_every=2, warmup_epochs=0, outputs="regions", target_spacing=6.0,
        deep_supervision=2, work_dir=tmp_path / "work", progress="none", version="ds"))

    assert len(traces) == 1  # the heads' metrics and losses were built before fit traced the step
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    for epoch in state["history"]:  # each head's loss is trained and logged
        assert np.isfinite(epoch["deep_supervision_1_loss"]) and np.isfinite(epoch["deep_supervision_2_loss"])
    # the checkpoint --resume continues from: the heads, their losses and the optimizer's state come back
    checkpoint = load_checkpoint(tmp_path / "work" / "last.keras")
    assert checkpoint.output_names == ["probabilities", "deep_supervision_1", "deep_supervision_2"]
    assert [getattr(loss, "factor", 1) for loss in checkpoint.loss] == [1, 2, 4]
    assert int(checkpoint.optimizer.iterations.numpy()) == 6

    with pytest.raises(BrainscanError, match="--deep-supervision 2"):  # its heads cannot be dropped halfway
        train_segmenter(SegmenterTrainConfig(
            data=data, arch="attention_unet3d", out=tmp_path / "models", preset="tiny", patch_size=24, epochs=3,
            steps_per_epoch=3, val_cases=1, outputs="regions", target_spacing=6.0, work_dir=tmp_path / "work",
            progress="none", version="ds-2", resume=True))

    bundle = load_bundle(bundle_path)  # rebuilt from the manifest's architecture: the heads are not in it
    assert len(bundle.model.outputs) == 1
    assert bundle.manifest["training"]["config"]["deep_supervision"] == 2
    assert "val_dice_mean" in state["history"][-1]  # validated through the served network
    network = served_network(checkpoint)
    for ours, stored in zip(network.weights, bundle.model.weights):  # float16 in the bundle
        np.testing.assert_allclose(np.asarray(stored), np.asarray(ours), rtol=2e-3, atol=2e-3)
    assert Path(bundle_path).name == "ds"

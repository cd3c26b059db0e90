"""The classifier's prediction path: temperature scaling, its fit, flip TTA and their choice on validation."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.errors import BundleError
from brainscan.inference.classifier import Classifier, apply_temperature, fit_temperature, select_calibration


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_temperature_softens_without_changing_the_prediction() -> None:
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 3, (50, 4)))
    np.testing.assert_array_equal(apply_temperature(p, 1.0), p.astype(np.float32))
    soft, sharp = apply_temperature(p, 2.0), apply_temperature(p, 0.5)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert (soft.argmax(axis=1) == p.argmax(axis=1)).all() and (sharp.argmax(axis=1) == p.argmax(axis=1)).all()
    assert (soft.max(axis=1) <= p.max(axis=1) + 1e-6).all() and (sharp.max(axis=1) >= p.max(axis=1) - 1e-6).all()
    # softmax(log p / T) is softmax(logits / T): the networks' softmax output loses nothing
    logits = rng.normal(0, 3, (5, 4))
    np.testing.assert_allclose(apply_temperature(softmax(logits), 3.0), softmax(logits / 3.0), atol=1e-6)


def test_fit_temperature_recovers_the_overconfidence() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 4))
    true_p = softmax(logits)
    y = np.array([rng.choice(4, p=row) for row in true_p])
    assert fit_temperature(true_p, y) == pytest.approx(1.0, abs=0.1)  # calibrated already
    overconfident = softmax(logits * 3.0)  # as if T = 1/3 had been applied
    assert fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="need"):
        fit_temperature(true_p[:3], y[:2])


def test_select_calibration_turns_flip_on_only_when_it_classifies_more_right() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 400)
    right = np.eye(4)[y] * 4.0
    plain = softmax(right * (rng.random((400, 1)) > 0.3) * 3 + rng.normal(0, 1, (400, 4)))
    better = softmax(right * 3 + rng.normal(0, 1, (400, 4)))
    chosen = select_calibration(plain, better, y)
    assert chosen["tta"] == ["flip_lr"] and chosen["accuracy_after"] > chosen["accuracy_before"]
    assert chosen["ece_after"] <= chosen["candidates"][1]["ece"] + 1e-9
    same = select_calibration(plain, plain, y)
    assert same["tta"] == [] and same["accuracy_after"] == same["accuracy_before"]
    assert same["nll_after"] <= same["nll_before"] + 1e-9  # the fitted temperature never raises the NLL


def test_classifier_averages_the_flipped_view_in_one_network_call() -> None:
    calls = []

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        left = batch[:, :, : batch.shape[2] // 2].mean(axis=(1, 2, 3))
        right = batch[:, :, batch.shape[2] // 2 :].mean(axis=(1, 2, 3))
        return softmax(np.stack([left, right, np.zeros_like(left), np.zeros_like(left)], axis=1))

    batch = np.zeros((3, 8, 8, 1), np.float32)
    batch[:, :, :4] = 2.0  # bright on the left
    plain = Classifier(None, None, "abcd", predict_fn=predict_fn)
    flip = Classifier(None, None, "abcd", tta=["flip_lr"], predict_fn=predict_fn)
    assert plain.forward(batch)[0, 0] > plain.forward(batch)[0, 1]
    averaged = flip.forward(batch)
    assert averaged[0, 0] == pytest.approx(averaged[0, 1])  # left-right symmetric after averaging
    assert calls[-1] == 6  # both views in one call
    assert flip.manifest_inference() == {"batch_size": 32, "tta": ["flip_lr"], "temperature": 1.0}
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        Classifier(None, None, "abcd", tta=["rotate"], predict_fn=predict_fn)
    with pytest.raises(ValueError, match="temperature"):
        Classifier(None, None, "abcd", temperature=0.0, predict_fn=predict_fn)


def test_from_bundle_refuses_a_segmenter_and_a_bad_section(tmp_path) -> None:
    pytest.importorskip("tensorflow")
    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore
    from tests.bundles import make_classifier_store

    root = make_classifier_store(tmp_path / "m", archs=("resnet50",), inference={"tta": ["flip_lr"], "temperature": 1.7})
    bundle = load_bundle(ModelStore(root).current("classification", "resnet50"))
    classifier = Classifier.from_bundle(bundle)
    assert classifier.tta == ("flip_lr",) and classifier.temperature == 1.7
    assert Classifier.from_bundle(bundle, overrides={"tta": [], "temperature": 1.0}).tta == ()
    with pytest.raises(BundleError, match="temperature"):
        Classifier.from_bundle(bundle, overrides={"temperature": -1})

"""Explanations: Grad-CAM (shape, range, gradient weighting on a hand-built quadrant model),
attention rollout (row normalisation, closed forms, token grid), gradient-weighted rollout (closed
forms, the replayed encoder equals the model, class specificity), overlay rendering."""

from __future__ import annotations

import base64

import cv2
import keras
import numpy as np
import pytest

from brainscan.explain import (
    AttentionRollout,
    GradCam,
    GradientAttentionRollout,
    LayerCam,
    StageTwoGradCam,
    attention_rollout,
    class_token_map,
    colorize,
    explainer_for,
    gradient_rollout,
    heatmap_pngs,
    model_view,
    png_data_url,
    stage_outputs,
)
from brainscan.models.registry import build_model
from brainscan.models.resnet import GRADCAM_LAYER

SIZE = 64
TINY = {"preset": "tiny", "input_size": SIZE, "num_classes": 4, "channels": 3}
QUADRANT_SIZE = 32


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {arch: build_model(arch, TINY) for arch in ("resnet50", "vit_cnn")}


@pytest.fixture(scope="module")
def explainers(tiny_models: dict) -> dict:
    """One explainer per architecture, shared so that Grad-CAM is traced once."""
    return {arch: explainer_for(model) for arch, model in tiny_models.items()}


def head_like(batch: int = 1, seed: int = 0) -> np.ndarray:
    """A bright disc with a brighter blob, plus noise: ``(batch, SIZE, SIZE, 3)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(batch):
        grey = np.zeros((SIZE, SIZE), np.float32)
        cv2.circle(grey, (SIZE // 2, SIZE // 2), SIZE // 3, 0.5, -1)
        cv2.circle(grey, (int(rng.integers(20, 44)), int(rng.integers(20, 44))), 6, 1.0, -1)
        grey = np.clip(grey + rng.normal(0, 0.05, grey.shape), 0, 1).astype(np.float32)
        images.append(np.repeat(grey[:, :, None], 3, axis=2))
    return np.stack(images)


# -- Grad-CAM and rollout on the real architectures ---------------------------------------------

@pytest.mark.parametrize(
    "arch, method, batch",
    [("resnet50", "grad-cam-stage2", 1), ("resnet50", "grad-cam-stage2", 3),
     ("vit_cnn", "gradient-attention-rollout", 1), ("vit_cnn", "gradient-attention-rollout", 2)],
)
def test_explainer_shape_and_range(explainers: dict, arch: str, method: str, batch: int) -> None:
    explainer = explainers[arch]
    assert explainer.method == method
    heat = explainer(head_like(batch))
    assert heat.shape == (batch, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert all(h.std() > 1e-3 for h in heat), "a non-trivial input must not give a constant heatmap"
    single = explainer(head_like(1)[0])
    assert single.shape == (SIZE, SIZE)


def test_grad_cam_on_the_vit_stem(tiny_models: dict) -> None:
    # the ViT-CNN names its last stem activation GRADCAM_LAYER too: Grad-CAM is the fallback
    heat = GradCam(tiny_models["vit_cnn"])(head_like(1), class_index=2)
    assert heat.shape == (1, SIZE, SIZE) and 0.0 <= heat.min() and heat.max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, call, message",
    [
        ({"layer_name": "no_such_layer"}, {}, "no layer"),
        ({"layer_name": "avg_pool"}, {}, "feature map"),
        ({}, {"class_index": 4}, "class_index must be in"),
        ({}, {"class_index": [0, 1]}, "2 entries for a batch of 1"),
        ({}, {"images": np.zeros((SIZE, SIZE))}, "images must be"),
    ],
)
def test_grad_cam_rejects_bad_arguments(tiny_models: dict, kwargs: dict, call: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cam = GradCam(tiny_models["resnet50"], **kwargs)
        cam(call.pop("images", head_like(1)), **call)


@pytest.mark.parametrize("explainer", [AttentionRollout, GradientAttentionRollout])
def test_rollout_needs_an_encoder(tiny_models: dict, explainer: type) -> None:
    with pytest.raises(ValueError, match="no encoder"):
        explainer(tiny_models["resnet50"])


def quadrant_model(quadrant: tuple[int, int]) -> keras.Model:
    """Feature map ``GRADCAM_LAYER`` with two channels: channel 0 holds the blurred image inside
    ``quadrant``, channel 1 inside the opposite quadrant. The class-0 logit is the mean of
    channel 0 only (class 1 is its negative), so only ``quadrant`` matters for the score while
    both quadrants are active: a map that ignored the gradients would split its mass."""
    half = QUADRANT_SIZE // 2
    mask = np.zeros((1, QUADRANT_SIZE, QUADRANT_SIZE, 2), np.float32)
    (row, col), (other_row, other_col) = quadrant, (1 - quadrant[0], 1 - quadrant[1])
    mask[0, row * half:(row + 1) * half, col * half:(col + 1) * half, 0] = 1.0
    mask[0, other_row * half:(other_row + 1) * half, other_col * half:(other_col + 1) * half, 1] = 1.0
    inputs = keras.Input((QUADRANT_SIZE, QUADRANT_SIZE, 1))
    blur = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, activation="relu", name="blur")
    features = keras.layers.Lambda(lambda x: x * mask, name=GRADCAM_LAYER)(blur(inputs))
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(2, name="logits")
    outputs = keras.layers.Activation("softmax")(dense(pooled))
    model = keras.Model(inputs, outputs)
    blur.set_weights([np.full((3, 3, 1, 2), 1.0 / 9.0, np.float32)])
    dense.set_weights([np.array([[1.0, -1.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    return model


@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_grad_cam_mass_concentrates_in_the_quadrant_the_score_reads(quadrant: tuple[int, int]) -> None:
    model = quadrant_model(quadrant)
    image = np.random.default_rng(3).uniform(0.2, 1.0, (1, QUADRANT_SIZE, QUADRANT_SIZE, 1)).astype(np.float32)
    cam = GradCam(model)
    heat = cam(image)[0]
    half = QUADRANT_SIZE // 2
    row, col = quadrant
    inside = heat[row * half:(row + 1) * half, col * half:(col + 1) * half].sum()
    assert inside / heat.sum() > 0.95
    # class 1 is argued against by every feature: nothing supports it, so its map is empty
    assert np.all(cam(image, class_index=1)[0] == 0.0)


def staged_model(size: int = 64) -> keras.Model:
    """A ResNet-shaped stack without learning: four averaging "stages" (strides 4, 2, 2, 2,
    named like the ResNet builder's) over a grey image, and a class-0 logit that is the mean of the
    last one, so the score is the image's brightness and a bright lesion is what argues for it."""
    inputs = keras.Input((size, size, 1))
    x, pools = inputs, []
    for stage, pool in enumerate((4, 2, 2, 2), start=1):
        pools.append(keras.layers.Conv2D(1, pool, strides=pool, use_bias=False, name=f"stage{stage}_pool"))
        x = keras.layers.Activation("relu", name=GRADCAM_LAYER if stage == 4 else f"stage{stage}_block1_out")(pools[-1](x))
    dense = keras.layers.Dense(2, name="logits")
    outputs = keras.layers.Activation("softmax")(dense(keras.layers.GlobalAveragePooling2D()(x)))
    model = keras.Model(inputs, outputs)
    for layer in pools:  # a strided average: (pool, pool, 1, 1) of 1 / pool^2
        layer.set_weights([np.full(layer.kernel.shape, 1.0 / np.prod(layer.kernel.shape[:2]), np.float32)])
    dense.set_weights([np.array([[1.0, -1.0]], np.float32), np.zeros(2, np.float32)])
    return model


@pytest.mark.parametrize("arch_or_staged, expected", [
    ("resnet50", ["stage1_block1_out", "stage2_block1_out", "stage3_block1_out", GRADCAM_LAYER]),
    ("staged", ["stage1_block1_out", "stage2_block1_out", "stage3_block1_out", GRADCAM_LAYER]),
])
def test_stage_outputs(tiny_models: dict, arch_or_staged: str, expected: list[str]) -> None:
    model = staged_model() if arch_or_staged == "staged" else tiny_models[arch_or_staged]
    assert stage_outputs(model) == expected


@pytest.mark.parametrize("explainer, grid", [(GradCam, SIZE // 32), (StageTwoGradCam, SIZE // 8)])
def test_resnet_map_resolution(tiny_models: dict, explainer: type, grid: int) -> None:
    # 2x2 cells for Grad-CAM on the last stage at 64 px, 8x8 on the second stage's output
    assert explainer(tiny_models["resnet50"])(head_like(1), upsample=False).shape == (1, grid, grid)


@pytest.mark.parametrize("lesion", [(12, 14), (40, 20), (24, 48), (50, 50)])
def test_stage_two_grad_cam_peaks_at_the_lesion(lesion: tuple[int, int]) -> None:
    image = np.full((1, SIZE, SIZE, 1), 0.2, np.float32)
    cv2.circle(image[0, :, :, 0], lesion[::-1], 4, 1.0, -1)
    model = staged_model(SIZE)
    fine = StageTwoGradCam(model)(image)[0]
    peak = np.unravel_index(fine.argmax(), fine.shape)
    assert np.hypot(peak[0] - lesion[0], peak[1] - lesion[1]) <= SIZE / 8, "the peak must be in the lesion's cell"
    coarse = GradCam(model)(image)[0]
    lesion_cell = (slice(lesion[0] // 8 * 8, lesion[0] // 8 * 8 + 8), slice(lesion[1] // 8 * 8, lesion[1] // 8 * 8 + 8))
    # the fine map gathers more of its mass in the lesion's 8x8 cell than the 2x2-cell map can
    assert fine[lesion_cell].sum() / fine.sum() > 1.5 * coarse[lesion_cell].sum() / coarse.sum()


def test_layer_cam_fuses_stages(tiny_models: dict) -> None:
    cam = LayerCam(tiny_models["resnet50"], stages=2)
    assert cam.layer_names == ("stage3_block1_out", GRADCAM_LAYER)
    heat = cam(head_like(2))
    assert heat.shape == (2, SIZE, SIZE) and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert cam(head_like(1), upsample=False).shape == (1, SIZE // 16, SIZE // 16)
    with pytest.raises(ValueError, match="stages must be"):
        LayerCam(tiny_models["resnet50"], stages=0)
    with pytest.raises(ValueError, match="no four ResNet stages"):
        StageTwoGradCam(quadrant_model((0, 0)))


# -- attention rollout --------------------------------------------------------------------------

def random_attention(rng: np.random.Generator, batch: int, heads: int, tokens: int) -> np.ndarray:
    logits = rng.normal(size=(batch, heads, tokens, tokens))
    weights = np.exp(logits)
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("batch, heads, tokens, depth", [(1, 2, 5, 1), (2, 3, 10, 4), (1, 1, 17, 6)])
def test_rollout_rows_are_normalised(batch: int, heads: int, tokens: int, depth: int) -> None:
    rng = np.random.default_rng(depth)
    joint = attention_rollout([random_attention(rng, batch, heads, tokens) for _ in range(depth)])
    assert joint.shape == (batch, tokens, tokens)
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
    assert joint.min() >= 0.0


def test_rollout_closed_forms() -> None:
    rng = np.random.default_rng(0)
    first, second = random_attention(rng, 1, 3, 6), random_attention(rng, 1, 3, 6)
    eye = np.eye(6)
    # softmax rows sum to 1, so adding I and renormalising is the average of attention and identity
    mixed = [0.5 * (a.mean(axis=1) + eye) for a in (first, second)]
    np.testing.assert_allclose(attention_rollout([first])[0], mixed[0][0], atol=1e-6)
    np.testing.assert_allclose(attention_rollout([first, second])[0], (mixed[1] @ mixed[0])[0], atol=1e-6)
    # attention to oneself only is the identity, whatever the depth
    identity = np.broadcast_to(eye, (1, 2, 6, 6))
    np.testing.assert_allclose(attention_rollout([identity] * 3)[0], eye, atol=1e-6)


@pytest.mark.parametrize("grid, hot_patch", [(2, 3), (4, 5), (4, 14)])
def test_class_token_map_points_at_the_attended_patch(grid: int, hot_patch: int) -> None:
    tokens = grid * grid + 1
    attention = np.full((1, 2, tokens, tokens), 1.0 / tokens, np.float32)
    attention[:, :, 0, :] = 0.0
    attention[:, :, 0, 1 + hot_patch] = 1.0  # the class token reads one patch only
    heat = class_token_map(attention_rollout([attention, attention]))
    assert heat.shape == (1, grid, grid)
    assert np.unravel_index(heat[0].argmax(), (grid, grid)) == divmod(hot_patch, grid)
    assert heat.max() == pytest.approx(1.0) and heat.min() == 0.0


@pytest.mark.parametrize(
    "attentions, kwargs, message",
    [
        ([], {}, "at least one block"),
        ([np.ones((1, 5, 5))], {}, "batch, heads, tokens, tokens"),
        ([np.ones((1, 1, 5, 5)), np.ones((1, 1, 6, 6))], {}, "disagrees"),
        ([np.ones((1, 1, 5, 5))], {"head_fusion": "median"}, "head_fusion"),
    ],
)
def test_rollout_rejects_bad_attention(attentions: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attention_rollout(attentions, **kwargs)


def test_class_token_map_needs_a_square_grid() -> None:
    with pytest.raises(ValueError, match="square grid"):
        class_token_map(np.eye(6, dtype=np.float32)[None])  # 5 patch tokens


def test_rollout_of_the_vit_has_the_token_grid(tiny_models: dict) -> None:
    from brainscan.models.vit_cnn import attention_maps

    model = tiny_models["vit_cnn"]
    joint = attention_rollout(attention_maps(model, head_like(1)))
    grid = SIZE // 4  # tiny preset: two stride-2 stem blocks
    assert joint.shape == (1, grid * grid + 1, grid * grid + 1)
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
    assert class_token_map(joint).shape == (1, grid, grid)


# -- gradient-weighted attention rollout (class-specific) ----------------------------------------

def test_gradient_rollout_closed_forms() -> None:
    rng = np.random.default_rng(1)
    first, second = random_attention(rng, 2, 3, 5), random_attention(rng, 2, 3, 5)
    grad_first, grad_second = rng.normal(size=first.shape), rng.normal(size=second.shape)
    eye = np.eye(5)
    bar = [np.maximum(g * a, 0).mean(axis=1) for a, g in ((first, grad_first), (second, grad_second))]
    np.testing.assert_allclose(gradient_rollout([first], [grad_first]), eye + bar[0], atol=1e-12)
    expected = (eye + bar[1]) @ (eye + bar[0])
    np.testing.assert_allclose(gradient_rollout([first, second], [grad_first, grad_second]), expected, atol=1e-12)
    # attention that only argues against the class leaves the identity: an empty map
    against = gradient_rollout([first, second], [-np.abs(grad_first), -np.abs(grad_second)])
    np.testing.assert_allclose(against, np.broadcast_to(eye, (2, 5, 5)))
    assert not class_token_map(against).any()


@pytest.mark.parametrize(
    "attentions, gradients, message",
    [
        ([], [], "at least one block"),
        ([np.ones((1, 1, 5, 5))], [], "1 attention blocks but 0 gradients"),
        ([np.ones((1, 1, 5, 5))], [np.ones((1, 1, 5, 4))], "must be the same"),
        ([np.ones((1, 1, 5, 5)), np.ones((1, 1, 6, 6))], [np.ones((1, 1, 5, 5)), np.ones((1, 1, 6, 6))], "disagrees"),
    ],
)
def test_gradient_rollout_rejects_bad_input(attentions: list, gradients: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gradient_rollout(attentions, gradients)


def test_replayed_encoder_equals_the_model(explainers: dict, tiny_models: dict) -> None:
    images = head_like(3, seed=4)
    heat, logits, chosen = explainers["vit_cnn"].explain(images)
    probabilities = np.asarray(tiny_models["vit_cnn"](images, training=False))
    replayed = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(replayed / replayed.sum(-1, keepdims=True), probabilities, atol=1e-5)
    np.testing.assert_array_equal(chosen, probabilities.argmax(-1))
    assert heat.shape == (3, SIZE, SIZE)


def test_vit_heatmap_depends_on_the_explained_class(explainers: dict) -> None:
    explainer = explainers["vit_cnn"]
    image = head_like(1, seed=5)
    maps = np.stack([explainer(image, class_index=c)[0] for c in range(4)])
    assert maps.shape == (4, SIZE, SIZE)
    differences = [np.abs(maps[a] - maps[b]).mean() for a in range(4) for b in range(a + 1, 4)]
    assert min(differences) > 1e-3, "maps of different classes must differ: the explanation is class-specific"
    with pytest.raises(ValueError, match="class_index must be in"):
        explainer(image, class_index=4)


# -- overlay --------------------------------------------------------------------------------------

def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return cv2.imdecode(np.frombuffer(base64.b64decode(url[len(prefix):]), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("heat_shape, view_size", [((2, 2), 64), ((16, 16), 64), ((64, 64), 64), ((7, 7), 224)])
def test_heatmap_pngs_have_the_view_size(heat_shape: tuple[int, int], view_size: int) -> None:
    heat = np.random.default_rng(0).uniform(0, 1, heat_shape).astype(np.float32)
    view = (np.arange(view_size * view_size) % 256).astype(np.uint8).reshape(view_size, view_size)
    pngs = heatmap_pngs(heat, view)
    image, overlay = decode_data_url(pngs["image_png"]), decode_data_url(pngs["overlay_png"])
    np.testing.assert_array_equal(image, view)
    assert overlay.shape == (view_size, view_size, 4)


def test_overlay_alpha_grows_with_importance() -> None:
    heat = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (4, 1))
    rgba = colorize(heat, max_alpha=0.5)
    alpha = rgba[0, :, 3].astype(int)
    assert alpha[0] == 0 and alpha[-1] == round(255 * 0.5)
    assert np.all(np.diff(alpha) >= 0)
    # JET runs from blue (cold) to red (hot); OpenCV stores BGR
    assert rgba[0, 0, 0] > rgba[0, 0, 2] and rgba[0, -1, 2] > rgba[0, -1, 0]


@pytest.mark.parametrize(
    "heat, kwargs, message",
    [
        (np.full((4, 4), 1.5), {}, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), {}, r"\[0, 1\]"),
        (np.zeros(4), {}, r"\(h, w\)"),
        (np.zeros((4, 4)), {"colormap": "rainbow"}, "colormap"),
        (np.zeros((4, 4)), {"max_alpha": 0.0}, "max_alpha"),
    ],
)
def test_colorize_rejects_bad_heatmaps(heat: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        colorize(heat, **kwargs)


@pytest.mark.parametrize(
    "image, value_range, expected_corners",
    [
        (np.array([[0.0, 1.0], [0.5, 0.25]]), (0.0, 1.0), [0, 255]),
        (np.array([[0.2, 0.4], [0.3, 0.3]]), (0.0, 1.0), [51, 102]),
        (np.array([[-2.0, 3.0], [0.0, 0.0]]), None, [0, 255]),  # zscore inputs: stretched
        (np.full((2, 2), 0.7), None, [0, 0]),
    ],
)
def test_model_view(image: np.ndarray, value_range: tuple | None, expected_corners: list[int]) -> None:
    view = model_view(np.repeat(image[:, :, None], 3, axis=2), value_range=value_range)
    assert view.dtype == np.uint8 and view.shape == (2, 2)
    assert [int(view[0, 0]), int(view[0, 1])] == expected_corners


def test_png_data_url_refuses_float_pixels() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png_data_url(np.zeros((4, 4), np.float32))

"""Architectures: registry names, output shapes, argument validation, parameter counts, structure
(bottlenecks, transformer blocks, 3D convolutions, attention gates), serialisation round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from brainscan.labels import BRATS_LABELS, KAGGLE_CLASSES, MODALITIES
from brainscan.models.layers import ClassToken, PositionEmbedding, SelectToken
from brainscan.models.registry import build_model, get_architecture
from brainscan.models.resnet import GRADCAM_LAYER
from brainscan.models.unet3d import spatial_divisor
from brainscan.models.vit_cnn import attention_maps, encoder_depth, resize_position_embedding

TINY_RESNET = {"preset": "tiny", "input_size": 64}
TINY_VIT = {"preset": "tiny", "input_size": 32}
TINY_UNET = {"preset": "tiny"}

# torchvision's published parameter count of ResNet50 with its 1000-class ImageNet head (no conv
# biases, BN gamma/beta only): an anchor that does not come from the code under test.
TORCHVISION_RESNET50_PARAMS = 25_557_032


@pytest.fixture(autouse=True)
def _seeded() -> None:
    keras.utils.set_random_seed(0)


def _random(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(1).normal(size=shape).astype("float32")


@pytest.mark.parametrize(
    "name, task",
    [
        ("resnet50", "classification"),
        ("vit_cnn", "classification"),
        ("unet3d", "segmentation"),
        ("attention_unet3d", "segmentation"),
    ],
)
def test_registered(name: str, task: str) -> None:
    assert get_architecture(name).task == task


@pytest.mark.parametrize(
    "name, args, input_shape, expected_output_shape",
    [
        ("resnet50", TINY_RESNET, (2, 64, 64, 3), (2, len(KAGGLE_CLASSES))),
        ("resnet50", {"preset": "tiny", "input_size": 48, "channels": 1, "num_classes": 3}, (1, 48, 48, 1), (1, 3)),
        ("vit_cnn", TINY_VIT, (2, 32, 32, 3), (2, len(KAGGLE_CLASSES))),
        ("vit_cnn", {"preset": "tiny", "input_size": 16, "channels": 1, "depth": 1}, (1, 16, 16, 1), (1, 4)),
        ("unet3d", TINY_UNET, (1, 32, 32, 32, len(MODALITIES)), (1, 32, 32, 32, len(BRATS_LABELS))),
        ("unet3d", TINY_UNET, (1, 8, 24, 40, 4), (1, 8, 24, 40, 4)),
        ("unet3d", {"preset": "tiny", "levels": 3, "norm": "group"}, (2, 12, 4, 20, 4), (2, 12, 4, 20, 4)),
        (
            "unet3d",
            {"preset": "tiny", "in_channels": 1, "num_classes": 2, "norm": "batch"},
            (1, 8, 8, 16, 1),
            (1, 8, 8, 16, 2),
        ),
        ("attention_unet3d", TINY_UNET, (1, 32, 32, 32, 4), (1, 32, 32, 32, 4)),
        ("attention_unet3d", TINY_UNET, (1, 24, 8, 16, 4), (1, 24, 8, 16, 4)),
        ("attention_unet3d", {"preset": "tiny", "spatial_size": (16, 8, 24)}, (1, 16, 8, 24, 4), (1, 16, 8, 24, 4)),
    ],
)
def test_forward_shapes_and_softmax(
    name: str, args: dict, input_shape: tuple[int, ...], expected_output_shape: tuple[int, ...]
) -> None:
    model = build_model(name, args)
    probabilities = model.predict_on_batch(_random(input_shape))
    assert probabilities.shape == expected_output_shape
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("resnet50", {"num_classes": 1}, "num_classes"),
        ("resnet50", {"input_size": 16}, "input_size"),
        ("resnet50", {"channels": 2}, "channels"),
        ("resnet50", {"preset": "huge"}, "preset"),
        ("resnet50", {"dropout": 1.0}, "dropout"),
        ("vit_cnn", {"embed_dim": 100, "num_heads": 6}, "divisible by num_heads"),
        ("vit_cnn", {"preset": "tiny", "depth": 0}, "depth"),
        ("vit_cnn", {"depth": 3}, "depth >= 4"),
        ("vit_cnn", {"input_size": 200}, "stem stride 16"),
        ("vit_cnn", {"input_size": 128}, "token grid"),
        ("vit_cnn", {"preset": "tiny", "stem_filters": []}, "stem_filters"),
        ("vit_cnn", {"preset": "tiny", "attention_dropout": -0.1}, "attention_dropout"),
        ("unet3d", {"levels": 1}, "levels"),
        ("unet3d", {"levels": 7}, "levels"),
        ("unet3d", {"base_filters": 0}, "base_filters"),
        ("unet3d", {"norm": "layer"}, "norm"),
        ("unet3d", {"spatial_size": (32, 32, 20)}, "spatial_size"),
        ("unet3d", {"preset": "medium"}, "preset"),
        ("attention_unet3d", {"num_classes": 1}, "num_classes"),
        ("attention_unet3d", {"in_channels": 0}, "in_channels"),
    ],
)
def test_bad_arguments(name: str, args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, args)


def _count(weights: list) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def _blocks_per_stage(model: keras.Model) -> list[int]:
    adds = [layer.name for layer in model.layers if layer.name.startswith("stage") and layer.name.endswith("_add")]
    return [sum(1 for n in adds if n.startswith(f"stage{s}_")) for s in (1, 2, 3, 4)]


def test_resnet50_full_matches_reference_size() -> None:
    model = build_model("resnet50", {"num_classes": 4, "input_size": 224})
    expected = TORCHVISION_RESNET50_PARAMS - (2048 * 1000 + 1000) + (2048 * 4 + 4)
    assert _count(model.trainable_weights) == expected
    assert 23.4e6 < model.count_params() < 23.7e6
    assert _blocks_per_stage(model) == [3, 4, 6, 3]
    assert model.get_layer(GRADCAM_LAYER).output.shape == (None, 7, 7, 2048)
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"


def test_resnet50_tiny_keeps_the_bottleneck_structure() -> None:
    model = build_model("resnet50", TINY_RESNET)
    assert _blocks_per_stage(model) == [1, 1, 1, 1]
    # 4x expansion of the last stage width 8 * 2**3
    assert model.get_layer(GRADCAM_LAYER).output.shape == (None, 2, 2, 256)
    assert isinstance(model.get_layer("stage4_block1_shortcut_conv"), keras.layers.Conv2D)


def test_vit_cnn_full_structure() -> None:
    model = build_model("vit_cnn", {"input_size": 224})
    depth = encoder_depth(model)
    assert depth >= 4
    for i in range(depth):
        attention = model.get_layer(f"encoder_{i}_mha")
        assert isinstance(attention, keras.layers.MultiHeadAttention)
        # pre-norm: query and value of the attention are the block's first LayerNorm output
        norm = model.get_layer(f"encoder_{i}_norm1")
        assert isinstance(norm, keras.layers.LayerNormalization)
        assert all(tensor is norm.output for tensor in attention.input)
    tokens = model.get_layer("class_token").output.shape
    assert tokens[1] >= 14 * 14 + 1
    assert model.get_layer("tokens").output.shape[1] >= 196
    assert isinstance(model.get_layer("encoder_norm"), keras.layers.LayerNormalization)


def test_vit_cnn_attention_maps() -> None:
    model = build_model("vit_cnn", TINY_VIT)
    maps = attention_maps(model, _random((2, 32, 32, 3)))
    tokens = (32 // 4) ** 2 + 1
    assert len(maps) == 2
    for scores in maps:
        assert scores.shape == (2, 2, tokens, tokens)
        np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=1e-5)


def test_resize_position_embedding_keeps_class_row_and_resamples_the_grid() -> None:
    dim, side = 3, 4
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([rows, cols, np.ones_like(rows)], axis=-1).astype(np.float32)  # a smooth (linear) table
    table = np.concatenate([np.full((1, 1, dim), 7.0, np.float32), grid.reshape(1, side * side, dim)], axis=1)
    same = resize_position_embedding(table, side)
    np.testing.assert_array_equal(same, table)
    for new_side in (2, 6):
        resized = resize_position_embedding(table, new_side)
        assert resized.shape == (1, 1 + new_side * new_side, dim) and resized.dtype == np.float32
        np.testing.assert_array_equal(resized[0, 0], [7.0, 7.0, 7.0])
        image = resized[0, 1:].reshape(new_side, new_side, dim)
        # a linear ramp stays a ramp: increasing along its axis, constant across it, same mean
        assert np.all(np.diff(image[:, 0, 0]) > 0) and np.allclose(image[:, :, 0], image[:, :1, 0], atol=1e-4)
        assert abs(image[..., 0].mean() - grid[..., 0].mean()) < 0.05
        np.testing.assert_allclose(image[..., 2], 1.0, atol=1e-4)


@pytest.mark.parametrize("shape, grid", [((1, 17, 8), 0), ((1, 16, 8), 4), ((2, 17, 8), 4), ((17, 8), 4)])
def test_resize_position_embedding_bad_arguments(shape: tuple[int, ...], grid: int) -> None:
    with pytest.raises(ValueError):
        resize_position_embedding(np.zeros(shape, np.float32), grid)


def _unet_params(base: int, levels: int, in_channels: int, classes: int, attention: bool) -> int:
    """Parameter count from the architecture's definition (bias-free 3x3x3 convs + 2-param norms)."""

    def block(cin: int, cout: int) -> int:
        return 27 * cin * cout + 2 * cout + 27 * cout * cout + 2 * cout

    widths = [base * 2**level for level in range(levels)]
    total = block(in_channels, widths[0]) + sum(block(widths[l - 1], widths[l]) for l in range(1, levels))
    for level in range(levels - 1):
        f, g = widths[level], widths[level + 1]
        total += 8 * g * f + f + block(2 * f, f)
        if attention:
            inter = f // 2
            total += 8 * f * inter + (g * inter + inter) + (inter + 1)
    return total + widths[0] * classes + classes


@pytest.mark.parametrize("name, attention", [("unet3d", False), ("attention_unet3d", True)])
def test_unet_full_parameter_count(name: str, attention: bool) -> None:
    model = build_model(name, {})
    assert model.count_params() == _unet_params(16, 4, 4, 4, attention)
    # MACHINE-NOTES: the 16/32/64/128 U-Net has 1.4 M parameters
    assert 1.35e6 < model.count_params() < 1.5e6


@pytest.mark.parametrize(
    "name, args, conv3d_count, multiplies",
    [
        ("unet3d", TINY_UNET, 2 * 7 + 1, 0),
        ("attention_unet3d", TINY_UNET, 2 * 7 + 1 + 3 * 3, 3),
        ("attention_unet3d", {"preset": "tiny", "levels": 5}, 2 * 9 + 1 + 3 * 4, 4),
    ],
)
def test_unet_is_truly_3d(name: str, args: dict, conv3d_count: int, multiplies: int) -> None:
    model = build_model(name, {**args, "spatial_size": (16, 16, 16)})
    conv3d = [layer for layer in model.layers if type(layer) is keras.layers.Conv3D]
    assert len(conv3d) == conv3d_count
    flat = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)
    assert not [layer.name for layer in model.layers if isinstance(layer, flat)]
    kernels = [w for w in model.weights if w.path.endswith("kernel")]
    assert kernels and all(len(w.shape) == 5 for w in kernels)
    assert sum(isinstance(layer, keras.layers.Multiply) for layer in model.layers) == multiplies


@pytest.mark.parametrize("levels", [4, 5])
def test_unet_resolution_levels(levels: int) -> None:
    size = 2 * spatial_divisor(levels)
    model = build_model("unet3d", {"preset": "tiny", "levels": levels, "spatial_size": (size, size, size)})
    resolutions = {layer.output.shape[1] for layer in model.layers if isinstance(layer, keras.layers.Conv3D)}
    assert len(resolutions) == levels >= 4
    assert min(resolutions) == size // 2 ** (levels - 1)


def test_attention_gate_multiplies_the_skip() -> None:
    model = build_model("attention_unet3d", TINY_UNET)
    gate = model.get_layer("attention_0_multiply")
    skip = model.get_layer("encoder_0_act2").output
    alpha = model.get_layer("attention_0_resample").output
    assert gate.input[0] is skip and gate.input[1] is alpha
    assert model.get_layer("attention_0_coefficients").get_config()["activation"] == "sigmoid"
    # the gated skip, not the raw one, reaches the decoder
    assert model.get_layer("decoder_0_concat").input[0] is gate.output
    probe = keras.Model(model.input, [skip, alpha, gate.output])
    skip_value, alpha_value, gated = probe.predict_on_batch(_random((1, 16, 16, 16, 4)))
    assert alpha_value.shape == (1, 16, 16, 16, 1)
    assert np.all((alpha_value > 0) & (alpha_value < 1))
    np.testing.assert_allclose(gated, skip_value * alpha_value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, args, input_shape",
    [
        ("resnet50", TINY_RESNET, (2, 64, 64, 3)),
        ("vit_cnn", TINY_VIT, (2, 32, 32, 3)),
        ("unet3d", TINY_UNET, (1, 16, 16, 16, 4)),
        ("attention_unet3d", TINY_UNET, (1, 16, 8, 24, 4)),
    ],
)
def test_keras_file_round_trip(tmp_path, name: str, args: dict, input_shape: tuple[int, ...]) -> None:
    model = build_model(name, args)
    x = _random(input_shape)
    expected = model.predict_on_batch(x)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: the layers are registered
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_allclose(loaded.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixed_policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "name, args", [("resnet50", TINY_RESNET), ("vit_cnn", TINY_VIT), ("attention_unet3d", TINY_UNET)]
)
def test_softmax_is_float32_under_mixed_precision(mixed_policy: str, name: str, args: dict) -> None:
    keras.mixed_precision.set_dtype_policy(mixed_policy)
    try:
        model = build_model(name, args)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("logits").compute_dtype == mixed_policy.removeprefix("mixed_")
    assert model.output.dtype == "float32"


@pytest.mark.parametrize(
    "layer",
    [ClassToken(name="cls"), ClassToken(initializer="ones"), PositionEmbedding(stddev=0.05), SelectToken(index=2)],
    ids=["class_token", "class_token_ones", "position_embedding", "select_token"],
)
def test_custom_layer_config_round_trip(layer: keras.layers.Layer) -> None:
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
    assert keras.saving.get_registered_name(type(layer)).startswith("brainscan>")


def test_custom_layers_compute_what_they_say() -> None:
    tokens = _random((2, 4, 8))
    with_class = ClassToken(initializer="ones")(tokens)
    assert tuple(with_class.shape) == (2, 5, 8)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(with_class[:, 0]), np.ones((2, 8)))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(with_class[:, 1:]), tokens)
    embedding = PositionEmbedding()
    shifted = keras.ops.convert_to_numpy(embedding(tokens))
    table = keras.ops.convert_to_numpy(embedding.embedding)[0]
    np.testing.assert_allclose(shifted - tokens, np.broadcast_to(table, tokens.shape), atol=1e-6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(SelectToken(index=3)(tokens)), tokens[:, 3])


@pytest.mark.parametrize(
    "make, message",
    [(lambda: PositionEmbedding(stddev=0.0), "stddev"), (lambda: SelectToken(index=-1), "index")],
)
def test_custom_layer_bad_arguments(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()

"""ResNet50 for 2D brain-MRI tumour classification, trained from scratch (no ImageNet here).

The network is written out here rather than taken from ``keras.applications.ResNet50`` so the
tiny test configuration and the full network run through the same code: ``preset="tiny"`` only
changes the number of bottleneck blocks per stage and the base width.

Architecture (He et al. 2016, "v1.5" as in torchvision: the stride of a down-sampling block sits
on its 3x3 convolution, which trains to a slightly better accuracy than the original 1x1 stride):

- stem: 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool;
- four stages of bottleneck blocks (1x1 -> 3x3 -> 1x1 with 4x expansion, projection shortcut on
  the first block of a stage), widths ``base, 2*base, 4*base, 8*base`` (64..512, outputs 256..2048);
- head: global average pooling -> dropout -> dense -> softmax (float32, safe under mixed precision).

Convolutions have no bias (BatchNorm follows each one). The last BatchNorm of every residual
branch starts at gamma = 0 (Goyal et al. 2017), so each block starts as the identity, which helps
training from scratch. The last convolutional feature map (``(batch, S/32, S/32, 8*base*4)``) is the
output of the layer named :data:`GRADCAM_LAYER`, for Grad-CAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from brainscan.labels import KAGGLE_CLASSES
from brainscan.models.registry import register_architecture

#: name of the layer whose output is the last convolutional feature map (Grad-CAM target)
GRADCAM_LAYER = "gradcam_target"
#: total down-sampling factor of the network (stem 4 x three strided stages 8)
TOTAL_STRIDE = 32
_BN_EPSILON = 1.001e-5
_EXPANSION = 4


@dataclass(frozen=True)
class ResNetPreset:
    """Depth and width of one configuration: bottleneck blocks per stage and stem width."""

    stage_blocks: tuple[int, int, int, int]
    base_filters: int


#: ``full`` is ResNet50 proper; ``tiny`` keeps the bottleneck structure for fast tests.
PRESETS: dict[str, ResNetPreset] = {
    "full": ResNetPreset(stage_blocks=(3, 4, 6, 3), base_filters=64),
    "tiny": ResNetPreset(stage_blocks=(1, 1, 1, 1), base_filters=8),
}


def _conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    relu: bool = True,
    zero_gamma: bool = False,
    name: str,
) -> keras.KerasTensor:
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(
        epsilon=_BN_EPSILON, gamma_initializer="zeros" if zero_gamma else "ones", name=f"{name}_bn"
    )(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def _bottleneck(
    x: keras.KerasTensor, filters: int, *, strides: int, project: bool, name: str, out_name: str | None = None
) -> keras.KerasTensor:
    """One bottleneck block: ``(B, H, W, C) -> (B, H/strides, W/strides, 4*filters)``."""
    shortcut = x
    if project:
        shortcut = _conv_bn(x, _EXPANSION * filters, 1, strides=strides, relu=False, name=f"{name}_shortcut")
    y = _conv_bn(x, filters, 1, name=f"{name}_1")
    y = _conv_bn(y, filters, 3, strides=strides, name=f"{name}_2")
    y = _conv_bn(y, _EXPANSION * filters, 1, relu=False, zero_gamma=True, name=f"{name}_3")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=out_name or f"{name}_out")(y)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_architecture(
    "resnet50",
    "classification",
    description="ResNet50 (bottleneck [3,4,6,3], v1.5) trained from scratch; preset='tiny' for tests",
)
def resnet50(
    num_classes: int = len(KAGGLE_CLASSES),
    input_size: int = 224,
    channels: int = 3,
    preset: str = "full",
    dropout: float = 0.2,
    name: str = "resnet50",
) -> keras.Model:
    """Build a ResNet50 image classifier.

    Args:
        num_classes: number of output classes (4 for the Kaggle set, in ``KAGGLE_CLASSES`` order).
        input_size: side ``S`` of the square input, at least 32 (the network down-samples 32x).
            Any size >= 32 works; multiples of 32 keep every stage's grid exact.
        channels: 1 (greyscale) or 3 (greyscale repeated, as ``preprocess_image`` produces).
        preset: ``"full"`` = ResNet50 (blocks [3, 4, 6, 3], widths 64..512, 2048 output features,
            23.5 M parameters with a 4-class head); ``"tiny"`` = the same structure with blocks
            [1, 1, 1, 1] and widths 8..64 (256 features, ~0.1 M parameters) for tests.
        dropout: dropout rate before the dense head, in [0, 1).
        name: Keras model name.

    Returns:
        ``keras.Model`` mapping ``(batch, S, S, channels)`` float images to ``(batch, num_classes)``
        float32 softmax probabilities. The layer :data:`GRADCAM_LAYER` outputs the last feature
        map, ``(batch, ceil(S/32), ceil(S/32), 32 * base_filters)``.

    Raises:
        ValueError: if an argument is out of range; the message names the value.

    Example:
        >>> model = resnet50(num_classes=4, input_size=128, channels=3)
        >>> model.output_shape
        (None, 4)
    """
    _check_int(num_classes, "num_classes", 2)
    _check_int(input_size, "input_size", TOTAL_STRIDE)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    config = PRESETS[preset]

    inputs = keras.Input(shape=(input_size, input_size, channels), name="image")
    x = _conv_bn(inputs, config.base_filters, 7, strides=2, name="stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    last_stage = len(config.stage_blocks) - 1
    for stage, blocks in enumerate(config.stage_blocks):
        filters = config.base_filters * 2**stage
        for block in range(blocks):
            is_last = stage == last_stage and block == blocks - 1
            x = _bottleneck(
                x,
                filters,
                # the first stage follows the max-pool, so it keeps its resolution
                strides=2 if block == 0 and stage > 0 else 1,
                project=block == 0,
                name=f"stage{stage + 1}_block{block + 1}",
                out_name=GRADCAM_LAYER if is_last else None,
            )
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)

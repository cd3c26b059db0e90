"""Hybrid ViT-CNN for 2D brain-MRI tumour classification (ViT "hybrid", Dosovitskiy et al. 2021).

A convolutional stem turns the image into a feature map; each feature-map position becomes a token
for a pre-norm transformer encoder; the class token feeds the head:

- stem: ``len(stem_filters)`` blocks of 3x3/2 conv -> BN -> ReLU (stride ``2**len(stem_filters)``;
  16 in the full preset, so a 224 image gives a 14x14 grid = 196 tokens). The last stem activation
  is named :data:`GRADCAM_LAYER`;
- 1x1 conv projection to ``embed_dim``, flattened to ``(batch, grid*grid, embed_dim)``;
- learned class token prepended (:class:`~brainscan.models.layers.ClassToken`), learned position
  embedding added (:class:`~brainscan.models.layers.PositionEmbedding`);
- ``depth`` pre-norm encoder blocks: ``x + Dropout(MHA(LN(x)))`` then ``x + MLP(LN(x))`` with a
  GELU MLP; the attention layer of block ``i`` is named ``encoder_{i}_mha`` and its input
  ``encoder_{i}_norm1`` (see :func:`attention_maps`);
- final LayerNorm, class token -> dropout -> dense -> softmax (float32, mixed-precision safe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from brainscan.labels import KAGGLE_CLASSES
from brainscan.models.layers import ClassToken, PositionEmbedding, SelectToken
from brainscan.models.registry import register_architecture

GRADCAM_LAYER = "gradcam_target"
#: the full preset must see at least this many tokens per side (14x14 at 224 px, stride 16)
MIN_FULL_GRID = 14
#: the full preset must have at least this many encoder blocks
MIN_FULL_DEPTH = 4
_LN_EPSILON = 1e-6


@dataclass(frozen=True)
class VitCnnPreset:
    """Stem widths (one stride-2 block each) and transformer size of one configuration."""

    stem_filters: tuple[int, ...]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int


#: ``full``: stride 16, 6 blocks of width 192 with 6 heads (~3.1 M parameters).
#: ``tiny``: stride 4, 2 blocks of width 16 with 2 heads, for tests (use input_size 32 -> 64 tokens).
PRESETS: dict[str, VitCnnPreset] = {
    "full": VitCnnPreset(stem_filters=(32, 64, 128, 256), embed_dim=192, depth=6, num_heads=6, mlp_dim=768),
    "tiny": VitCnnPreset(stem_filters=(8, 16), embed_dim=16, depth=2, num_heads=2, mlp_dim=32),
}


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _encoder_block(
    x: keras.KerasTensor, *, index: int, num_heads: int, mlp_dim: int, dropout: float, attention_dropout: float
) -> keras.KerasTensor:
    """One pre-norm transformer block, ``(B, N, E) -> (B, N, E)``."""
    embed_dim = x.shape[-1]
    prefix = f"encoder_{index}"
    h = layers.LayerNormalization(epsilon=_LN_EPSILON, name=f"{prefix}_norm1")(x)
    h = layers.MultiHeadAttention(
        num_heads=num_heads, key_dim=embed_dim // num_heads, dropout=attention_dropout, name=f"{prefix}_mha"
    )(h, h)
    h = layers.Dropout(dropout, name=f"{prefix}_attention_dropout")(h)
    x = layers.Add(name=f"{prefix}_attention_residual")([x, h])
    h = layers.LayerNormalization(epsilon=_LN_EPSILON, name=f"{prefix}_norm2")(x)
    h = layers.Dense(mlp_dim, activation="gelu", name=f"{prefix}_mlp_dense1")(h)
    h = layers.Dropout(dropout, name=f"{prefix}_mlp_dropout1")(h)
    h = layers.Dense(embed_dim, name=f"{prefix}_mlp_dense2")(h)
    h = layers.Dropout(dropout, name=f"{prefix}_mlp_dropout2")(h)
    return layers.Add(name=f"{prefix}_mlp_residual")([x, h])


@register_architecture(
    "vit_cnn",
    "classification",
    description="Hybrid ViT: conv stem (stride 16) + pre-norm transformer encoder; preset='tiny' for tests",
)
def vit_cnn(
    num_classes: int = len(KAGGLE_CLASSES),
    input_size: int = 224,
    channels: int = 3,
    preset: str = "full",
    stem_filters: tuple[int, ...] | list[int] | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_dim: int | None = None,
    dropout: float = 0.1,
    attention_dropout: float = 0.0,
    name: str = "vit_cnn",
) -> keras.Model:
    """Build the hybrid ViT-CNN classifier.

    ``preset`` supplies the sizes; any of ``stem_filters``, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_dim`` given explicitly overrides it (record all of them in the manifest).

    Args:
        num_classes: number of output classes (``KAGGLE_CLASSES`` order).
        input_size: side ``S`` of the square input; must be divisible by the stem stride
            ``2**len(stem_filters)``.
        channels: 1 or 3.
        preset: ``"full"`` (stem (32, 64, 128, 256), stride 16, embed 192, depth 6, 6 heads, MLP 768)
            or ``"tiny"`` (stem (8, 16), stride 4, embed 16, depth 2, 2 heads, MLP 32).
        stem_filters: widths of the stride-2 stem blocks.
        embed_dim: token width; divisible by ``num_heads``.
        depth: number of encoder blocks (>= 1; >= 4 with the full preset).
        num_heads: attention heads per block.
        mlp_dim: hidden width of the encoder MLPs.
        dropout: dropout after attention, in the MLP and before the head, in [0, 1).
        attention_dropout: dropout on the attention weights, in [0, 1).
        name: Keras model name.

    Returns:
        ``keras.Model``: ``(batch, S, S, channels)`` -> ``(batch, num_classes)`` float32 softmax.
        Tokens: ``(batch, (S/stride)**2 + 1, embed_dim)`` (197 x 192 at 224 px, full preset).

    Raises:
        ValueError: if an argument is out of range or inconsistent; the message names the value.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset]
    stem_filters = tuple(base.stem_filters if stem_filters is None else stem_filters)
    embed_dim = base.embed_dim if embed_dim is None else embed_dim
    depth = base.depth if depth is None else depth
    num_heads = base.num_heads if num_heads is None else num_heads
    mlp_dim = base.mlp_dim if mlp_dim is None else mlp_dim

    _positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    _positive_int(input_size, "input_size")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not stem_filters:
        raise ValueError(f"stem_filters must hold at least one width, got {stem_filters!r}")
    for width in stem_filters:
        _positive_int(width, "each stem_filters entry")
    for value, label in ((embed_dim, "embed_dim"), (depth, "depth"), (num_heads, "num_heads"), (mlp_dim, "mlp_dim")):
        _positive_int(value, label)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}")
    stride = 2 ** len(stem_filters)
    if input_size % stride:
        raise ValueError(f"input_size must be divisible by the stem stride {stride}, got {input_size}")
    grid = input_size // stride
    if preset == "full":
        if grid < MIN_FULL_GRID:
            raise ValueError(
                f"the full preset needs a token grid of at least {MIN_FULL_GRID}x{MIN_FULL_GRID}; "
                f"input_size {input_size} with stem stride {stride} gives {grid}x{grid}"
            )
        if depth < MIN_FULL_DEPTH:
            raise ValueError(f"the full preset needs depth >= {MIN_FULL_DEPTH}, got {depth}")
    for value, label in ((dropout, "dropout"), (attention_dropout, "attention_dropout")):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {value}")

    inputs = keras.Input(shape=(input_size, input_size, channels), name="image")
    x = inputs
    for i, width in enumerate(stem_filters):
        x = layers.Conv2D(
            width, 3, strides=2, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"stem_{i}_conv"
        )(x)
        x = layers.BatchNormalization(name=f"stem_{i}_bn")(x)
        is_last = i == len(stem_filters) - 1
        x = layers.Activation("relu", name=GRADCAM_LAYER if is_last else f"stem_{i}_relu")(x)
    x = layers.Conv2D(embed_dim, 1, name="patch_projection")(x)
    x = layers.Reshape((grid * grid, embed_dim), name="tokens")(x)
    x = ClassToken(name="class_token")(x)
    x = PositionEmbedding(name="position_embedding")(x)
    x = layers.Dropout(dropout, name="embedding_dropout")(x)
    for index in range(depth):
        x = _encoder_block(
            x, index=index, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout, attention_dropout=attention_dropout
        )
    x = layers.LayerNormalization(epsilon=_LN_EPSILON, name="encoder_norm")(x)
    x = SelectToken(0, name="class_token_output")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def resize_position_embedding(table: np.ndarray, grid: int) -> np.ndarray:
    """Fit a learned position table to another token grid (fine-tuning at another input size).

    The class token's row is kept; the ``g x g`` rows of the image tokens are resized as an image to
    ``grid x grid`` (bicubic, antialiased when shrinking), as ViTs are fine-tuned at a new
    resolution (Dosovitskiy et al. 2021, section 3.2).

    Args:
        table: ``(1, 1 + g*g, dim)``, a :class:`~brainscan.models.layers.PositionEmbedding` table.
        grid: tokens per side of the new grid.

    Returns:
        ``(1, 1 + grid*grid, dim)`` float32.

    Raises:
        ValueError: ``table`` is not a class-token-plus-square-grid table, or ``grid`` < 1.
    """
    table = np.asarray(table, dtype=np.float32)
    tokens = table.shape[1] - 1 if table.ndim == 3 else -1
    side = int(np.sqrt(max(tokens, 0)))
    if table.ndim != 3 or table.shape[0] != 1 or tokens < 1 or side * side != tokens:
        raise ValueError(f"expected a (1, 1 + g*g, dim) position table, got shape {table.shape}")
    if int(grid) < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    if side == grid:
        return table.copy()
    image = table[0, 1:].reshape(1, side, side, table.shape[2])
    resized = keras.ops.image.resize(image, (int(grid), int(grid)), interpolation="bicubic",
                                     antialias=grid < side)
    return np.concatenate([table[:, :1], np.asarray(resized, np.float32).reshape(1, grid * grid, -1)], axis=1)


def encoder_depth(model: keras.Model) -> int:
    """Number of encoder blocks in a model built by :func:`vit_cnn` (counts ``encoder_{i}_mha``)."""
    return sum(1 for layer in model.layers if layer.name.startswith("encoder_") and layer.name.endswith("_mha"))


def attention_maps(model: keras.Model, images: np.ndarray) -> list[np.ndarray]:
    """Attention weights of every encoder block, for attention rollout.

    Re-runs each ``encoder_{i}_mha`` layer on the output of ``encoder_{i}_norm1`` with
    ``return_attention_scores=True`` (inference mode, so attention dropout is off).

    Args:
        model: a model built by :func:`vit_cnn`.
        images: ``(batch, S, S, channels)`` preprocessed images.

    Returns:
        One float32 array per block, ``(batch, num_heads, tokens, tokens)``; token 0 is the class
        token, rows sum to 1.

    Raises:
        ValueError: if ``model`` has no ``encoder_{i}_mha`` layers.
    """
    return attention_function(model)(images)


def attention_function(model: keras.Model) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Build once what :func:`attention_maps` needs, and return ``images -> attention maps``.

    The classifier service explains each request with it: building the functional model that
    exposes the ``encoder_{i}_norm1`` outputs is the slow part, so it happens here, once. Each call
    then re-runs the ``encoder_{i}_mha`` layers (shared weights) with ``return_attention_scores``.

    Raises:
        ValueError: if ``model`` has no ``encoder_{i}_mha`` layers.
    """
    depth = encoder_depth(model)
    if depth == 0:
        raise ValueError(f"model {model.name!r} has no encoder_{{i}}_mha layers")
    normed = keras.Model(model.input, [model.get_layer(f"encoder_{i}_norm1").output for i in range(depth)])
    attention_layers = [model.get_layer(f"encoder_{i}_mha") for i in range(depth)]

    def maps(images: np.ndarray) -> list[np.ndarray]:
        result = []
        for layer, query in zip(attention_layers, normed(images, training=False)):
            _, scores = layer(query, query, return_attention_scores=True, training=False)
            result.append(keras.ops.convert_to_numpy(keras.ops.cast(scores, "float32")))
        return result

    return maps


def attention_gradient_function(model: keras.Model) -> Callable[[np.ndarray, np.ndarray], tuple[list[np.ndarray], ...]]:
    """Build once ``(images, class_index) -> (attentions, gradients, logits, chosen)`` for class-specific
    explanations (gradient-weighted attention rollout, Chefer et al. 2021).

    Replays the encoder layer by layer from the embedding (shared weights, inference mode, so every
    dropout is off), with ``return_attention_scores`` on each ``encoder_{i}_mha``, and takes the
    gradient of the chosen class's logit (before the softmax) with respect to each block's attention
    weights. ``class_index`` is int32 ``(B,)``; ``-1`` picks each image's predicted class.

    Returns:
        A function giving one float32 ``(B, heads, tokens, tokens)`` array per block for the
        attentions and for their gradients, the replayed logits ``(B, classes)`` (equal to the
        model's; tests check it) and the explained class per image ``(B,)``.

    Raises:
        ValueError: if ``model`` has no ``encoder_{i}_mha`` layers.
    """
    import tensorflow as tf

    depth = encoder_depth(model)
    if depth == 0:
        raise ValueError(f"model {model.name!r} has no encoder_{{i}}_mha layers")
    embed = keras.Model(model.input, model.get_layer("embedding_dropout").output)
    get = model.get_layer
    blocks = [
        tuple(get(f"encoder_{i}_{part}") for part in ("norm1", "mha", "norm2", "mlp_dense1", "mlp_dense2"))
        for i in range(depth)
    ]
    final_norm, head = get("encoder_norm"), get("logits")

    @tf.function(reduce_retracing=True)
    def run(images: tf.Tensor, class_index: tf.Tensor):
        x = embed(images, training=False)
        attentions = []
        with tf.GradientTape() as tape:
            tape.watch(x)
            for norm1, mha, norm2, dense1, dense2 in blocks:
                h = norm1(x)
                h, attention = mha(h, h, return_attention_scores=True, training=False)
                attentions.append(attention)
                x = x + h
                x = x + dense2(dense1(norm2(x)))
            logits = tf.cast(head(final_norm(x)[:, 0]), tf.float32)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            chosen = tf.where(class_index < 0, predicted, class_index)
            selected = tf.gather(logits, chosen, axis=1, batch_dims=1)
        gradients = tape.gradient(selected, attentions)
        return attentions, gradients, logits, chosen

    def call(images: np.ndarray, class_index: np.ndarray):
        attentions, gradients, logits, chosen = run(tf.convert_to_tensor(images, tf.float32),
                                                    tf.convert_to_tensor(class_index, tf.int32))
        as_numpy = lambda tensors: [np.asarray(tf.cast(t, tf.float32)) for t in tensors]  # noqa: E731
        return as_numpy(attentions), as_numpy(gradients), np.asarray(logits), np.asarray(chosen)

    return call

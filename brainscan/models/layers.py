"""Custom Keras layers shared by the brainscan architectures.

Every layer here is registered with :func:`keras.saving.register_keras_serializable` under the
``brainscan`` package and implements ``get_config()``, so a ``.keras`` file that uses them loads
with plain ``keras.saving.load_model(path)`` once this module has been imported (importing
``brainscan.models.vit_cnn`` or calling ``build_model`` does that).

Shapes use ``(batch, tokens, dim)`` for token sequences.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

_PACKAGE = "brainscan"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassToken(keras.layers.Layer):
    """Prepend one learned class token to a token sequence (ViT, Dosovitskiy et al. 2021).

    Input shape ``(batch, tokens, dim)``; output shape ``(batch, tokens + 1, dim)``, the class
    token at index 0. The token starts at zero, as in the reference ViT implementation: the
    position embedding added afterwards makes it distinct from the patch tokens.

    Args:
        initializer: Keras initializer (name or config) for the ``(1, 1, dim)`` token.
        **kwargs: passed to :class:`keras.layers.Layer` (``name``, ``dtype``...).
    """

    def __init__(self, initializer: str | dict[str, Any] = "zeros", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(f"ClassToken expects (batch, tokens, dim) with a known dim, got {input_shape}")
        self.token = self.add_weight(
            name="token", shape=(1, 1, input_shape[-1]), initializer=self.initializer, trainable=True
        )

    def call(self, tokens: Any) -> Any:
        batch = ops.shape(tokens)[0]
        token = ops.cast(self.token, tokens.dtype)
        token = ops.broadcast_to(token, (batch, 1, ops.shape(tokens)[-1]))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        batch, count, dim = input_shape
        return (batch, None if count is None else count + 1, dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["initializer"] = keras.initializers.serialize(self.initializer)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PositionEmbedding(keras.layers.Layer):
    """Add a learned position embedding to a fixed-length token sequence.

    Input and output shape ``(batch, tokens, dim)``; ``tokens`` must be known when the layer is
    built (the model's input size is fixed), since one ``(tokens, dim)`` table is learned.

    Args:
        stddev: standard deviation of the truncated-normal initial table (0.02 as in ViT).
        **kwargs: passed to :class:`keras.layers.Layer`.

    Raises:
        ValueError: if ``stddev`` is not positive, or the token count is unknown at build time.
    """

    def __init__(self, stddev: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not stddev > 0:
            raise ValueError(f"stddev must be > 0, got {stddev}")
        self.stddev = float(stddev)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if len(input_shape) != 3 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"PositionEmbedding needs (batch, tokens, dim) with known tokens and dim, got {input_shape}"
            )
        self.embedding = self.add_weight(
            name="embedding",
            shape=(1, input_shape[1], input_shape[2]),
            initializer=keras.initializers.TruncatedNormal(stddev=self.stddev),
            trainable=True,
        )

    def call(self, tokens: Any) -> Any:
        return tokens + ops.cast(self.embedding, tokens.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["stddev"] = self.stddev
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SelectToken(keras.layers.Layer):
    """Pick one token out of a sequence, e.g. the class token for the classification head.

    Input shape ``(batch, tokens, dim)``; output shape ``(batch, dim)``.

    Args:
        index: position of the token to keep (0 = the class token of :class:`ClassToken`).
        **kwargs: passed to :class:`keras.layers.Layer`.

    Raises:
        ValueError: if ``index`` is negative.
    """

    def __init__(self, index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(index) != index or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        self.index = int(index)

    def call(self, tokens: Any) -> Any:
        return tokens[:, self.index, :]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[2])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["index"] = self.index
        return config

"""3D U-Net and Attention U-Net for BraTS brain-tumour segmentation (Keras 3, Conv3D throughout).

One builder, :func:`build_unet3d`, makes both networks; ``attention=True`` puts an additive
attention gate (Oktay et al. 2018, "Attention U-Net") on every skip connection. Registered as
``"unet3d"`` (Çiçek et al. 2016) and ``"attention_unet3d"``; both take ``members=K`` for an ensemble of K
such networks whose probabilities are averaged (:func:`average_of`).

Layout, with ``F_l = base_filters * 2**l`` for resolution level ``l = 0 .. levels-1``:

- encoder level ``l``: [Conv3D 3x3x3 -> norm -> LeakyReLU(0.01)] x 2 with ``F_l`` filters, then
  2x2x2 max-pool (not after the deepest level, the bottleneck);
- decoder level ``l`` (from ``levels-2`` up to 0): 2x2x2 stride-2 Conv3DTranspose to ``F_l``,
  concatenate the (gated) encoder skip of level ``l``, [Conv3D -> norm -> LeakyReLU] x 2;
- head: 1x1x1 Conv3D to ``num_classes`` -> softmax over channels in float32 (``output="softmax"``,
  one class per voxel) or an independent sigmoid per channel (``output="sigmoid"``: the nested
  BraTS regions WT/TC/ET of :data:`~brainscan.labels.REGION_ORDER`, nnU-Net's region training).

Normalisation defaults to instance norm (``GroupNormalization(groups=-1)``): BatchNorm statistics
are poor at the batch sizes of 1-2 that 128^3 patches allow.

The network is fully convolutional: spatial dims may be ``None`` but each must be divisible by
:func:`spatial_divisor` ``(levels) = 2**(levels-1)`` (8 for 4 levels); ``preprocess_case`` pads to
``VolumePreprocessConfig.divisor``, which must be a multiple of it.

Output channel ``k`` is the class of BraTS label ``BRATS_LABELS[k]``: background, NCR, ED, ET.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
from keras import layers

from brainscan.labels import BRATS_LABELS, MODALITIES
from brainscan.models.registry import register_architecture

#: ``full`` = 16/32/64/128 filters (~1.4 M parameters); ``small`` = 8/16/32/64 (~0.35 M, about 2x
#: faster to train on CPUs without AVX-512); ``tiny`` = 4/8/16/32, for tests.
PRESETS: dict[str, dict[str, int]] = {
    "full": {"base_filters": 16, "levels": 4},
    "small": {"base_filters": 8, "levels": 4},
    "tiny": {"base_filters": 4, "levels": 4},
}
NORMS = ("instance", "group", "batch")
OUTPUTS = ("softmax", "sigmoid")
MIN_LEVELS, MAX_LEVELS = 2, 6
_GROUPS = 8


def spatial_divisor(levels: int) -> int:
    """Each spatial dim of the input must be a multiple of this: ``2**(levels - 1)``."""
    return 2 ** (levels - 1)


def _normalization(norm: str, filters: int, name: str) -> layers.Layer:
    if norm == "instance":
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)
    if norm == "group":
        return layers.GroupNormalization(groups=math.gcd(_GROUPS, filters), epsilon=1e-5, name=name)
    return layers.BatchNormalization(name=name)


def _conv_block(x: keras.KerasTensor, filters: int, norm: str, name: str) -> keras.KerasTensor:
    """``(B, D, H, W, C) -> (B, D, H, W, filters)``: two conv -> norm -> LeakyReLU units."""
    for i in (1, 2):
        x = layers.Conv3D(
            filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv{i}"
        )(x)
        x = _normalization(norm, filters, f"{name}_norm{i}")(x)
        x = layers.LeakyReLU(negative_slope=0.01, name=f"{name}_act{i}")(x)
    return x


def _attention_gate(
    skip: keras.KerasTensor, gating: keras.KerasTensor, inter_filters: int, name: str
) -> keras.KerasTensor:
    """Additive attention gate (Oktay et al. 2018), as a functional sub-graph.

    Args:
        skip: encoder features ``x``, ``(B, D, H, W, C)``.
        gating: decoder features ``g`` one level coarser, ``(B, D/2, H/2, W/2, C_g)``.
        inter_filters: width of the intermediate space.
        name: prefix of the gate's layers.

    Returns:
        ``skip * alpha`` with ``alpha = sigmoid(psi(relu(theta(x) + phi(g))))`` resampled to the
        skip resolution: ``(B, D, H, W, C)``. ``alpha`` itself is the output of the layer
        ``{name}_coefficients`` (``(B, D/2, H/2, W/2, 1)``), for visualising the gate.
    """
    # theta: 2x2x2 stride-2 conv brings x down to the gating resolution, as in the paper's code
    theta = layers.Conv3D(inter_filters, 2, strides=2, use_bias=False, name=f"{name}_theta")(skip)
    phi = layers.Conv3D(inter_filters, 1, name=f"{name}_phi")(gating)
    f = layers.Add(name=f"{name}_add")([theta, phi])
    f = layers.Activation("relu", name=f"{name}_relu")(f)
    psi = layers.Conv3D(1, 1, name=f"{name}_psi")(f)
    alpha = layers.Activation("sigmoid", name=f"{name}_coefficients")(psi)
    alpha = layers.UpSampling3D(2, name=f"{name}_resample")(alpha)
    # the (B, D, H, W, 1) coefficients broadcast over the skip's channels
    return layers.Multiply(name=f"{name}_multiply")([skip, alpha])


def build_unet3d(
    *,
    num_classes: int = len(BRATS_LABELS),
    in_channels: int = len(MODALITIES),
    base_filters: int = 16,
    levels: int = 4,
    norm: str = "instance",
    attention: bool = False,
    spatial_size: Sequence[int] | None = None,
    output: str = "softmax",
    name: str = "unet3d",
) -> keras.Model:
    """Build a 3D U-Net, with attention-gated skips if ``attention``.

    Args:
        num_classes: output channels (4: background, NCR, ED, ET in ``BRATS_LABELS`` order).
        in_channels: input channels (4 modalities in ``MODALITIES`` order).
        base_filters: filters at full resolution; level ``l`` has ``base_filters * 2**l``.
        levels: resolution levels including the bottleneck, in [2, 6] (4 = three poolings).
        norm: ``"instance"`` (default), ``"group"`` (up to 8 groups) or ``"batch"``.
        attention: gate each skip connection with an additive attention gate.
        spatial_size: fixed ``(D, H, W)``, each a multiple of ``2**(levels-1)``; ``None`` leaves
            the spatial dims free (fully convolutional).
        output: ``"softmax"`` (classes, sum to 1) or ``"sigmoid"`` (independent regions).
        name: Keras model name.

    Returns:
        ``keras.Model``: ``(batch, D, H, W, in_channels)`` -> ``(batch, D, H, W, num_classes)``
        float32 probabilities (softmax: sum to 1 over the last axis; sigmoid: each in [0, 1]).

    Raises:
        ValueError: if an argument is out of range; the message names the value.
    """
    integer_args = ((num_classes, "num_classes", 1), (in_channels, "in_channels", 1), (base_filters, "base_filters", 1))
    for value, label, minimum in integer_args:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an integer in [{MIN_LEVELS}, {MAX_LEVELS}], got {levels!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "softmax" and num_classes < 2:
        raise ValueError(f"a softmax output needs num_classes >= 2, got {num_classes}")
    divisor = spatial_divisor(levels)
    if spatial_size is None:
        shape: tuple[int | None, ...] = (None, None, None)
    else:
        shape = tuple(spatial_size)
        if len(shape) != 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < divisor or s % divisor for s in shape
        ):
            raise ValueError(
                f"spatial_size must be 3 positive multiples of {divisor} (2**(levels-1)), got {spatial_size!r}"
            )

    inputs = keras.Input(shape=(*shape, in_channels), name="volume")
    skips = []
    x = inputs
    for level in range(levels):
        x = _conv_block(x, base_filters * 2**level, norm, name=f"encoder_{level}")
        if level < levels - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name=f"encoder_{level}_pool")(x)
    for level in range(levels - 2, -1, -1):
        filters = base_filters * 2**level
        skip = skips[level]
        if attention:
            skip = _attention_gate(skip, x, inter_filters=max(1, filters // 2), name=f"attention_{level}")
        x = layers.Conv3DTranspose(filters, 2, strides=2, name=f"decoder_{level}_up")(x)
        x = layers.Concatenate(axis=-1, name=f"decoder_{level}_concat")([skip, x])
        x = _conv_block(x, filters, norm, name=f"decoder_{level}")
    x = layers.Conv3D(num_classes, 1, name="logits")(x)
    outputs = layers.Activation(output, dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def average_of(networks: Sequence[keras.Model], name: str) -> keras.Model:
    """One model whose output is the mean of ``networks``' outputs (an ensemble, e.g. of the folds of a
    cross-validation: nnU-Net's default). The networks run on the same input in one call; each is a
    sub-model, so its weights follow the previous one's in ``model.weights``.
    """
    inputs = keras.Input(shape=tuple(networks[0].inputs[0].shape[1:]), name="volume")
    outputs = [network(inputs) for network in networks]
    averaged = layers.Average(dtype="float32", name="probabilities")(outputs)
    return keras.Model(inputs, averaged, name=name)


def _resolve(preset: str, base_filters: int | None, levels: int | None) -> tuple[int, int]:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    config = PRESETS[preset]
    return (
        config["base_filters"] if base_filters is None else base_filters,
        config["levels"] if levels is None else levels,
    )


def _registered_variant(arch: str, attention: bool, description: str, doc: str) -> Callable[..., keras.Model]:
    """Register the builder of one U-Net variant under ``arch`` (the two differ only in their skips)."""

    @register_architecture(arch, "segmentation", description=description)
    def builder(
        num_classes: int = len(BRATS_LABELS),
        in_channels: int = len(MODALITIES),
        preset: str = "full",
        base_filters: int | None = None,
        levels: int | None = None,
        norm: str = "instance",
        spatial_size: Sequence[int] | None = None,
        output: str = "softmax",
        name: str = arch,
        members: int = 1,
    ) -> keras.Model:
        base_filters, levels = _resolve(preset, base_filters, levels)
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members!r}")

        def network(label: str) -> keras.Model:
            return build_unet3d(
                num_classes=num_classes, in_channels=in_channels, base_filters=base_filters, levels=levels,
                norm=norm, attention=attention, spatial_size=spatial_size, output=output, name=label,
            )

        if members == 1:
            return network(name)
        return average_of([network(f"{name}_member{k}") for k in range(members)], name=name)

    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = doc
    return builder


unet3d = _registered_variant(
    "unet3d", False, "3D U-Net, 4 levels of 16..128 filters (preset='tiny': 4..32)",
    """Registered builder of the plain 3D U-Net; see :func:`build_unet3d`.

    ``preset`` (``"full"``: base_filters 16, levels 4; ``"tiny"``: 4, 4) gives the defaults that an
    explicit ``base_filters`` / ``levels`` overrides.
    """,
)
attention_unet3d = _registered_variant(
    "attention_unet3d", True, "3D Attention U-Net (Oktay et al. 2018): gated skips",
    """Registered builder of the 3D Attention U-Net; see :func:`build_unet3d` (``attention=True``).""",
)

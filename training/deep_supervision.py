"""Deep supervision, as nnU-Net trains: extra output heads on the coarser decoder levels of a U-Net.

During training only, each decoder level ``1..N`` below full resolution (1/2, 1/4 ... of the patch) gets a
1x1x1 convolution to the network's outputs with the network's own activation (sigmoid regions or softmax
classes), and the loss is the weighted sum of the full-resolution loss and each head's loss against the targets
average-pooled to its resolution (:class:`training.losses.DownsampledLoss`), with weights 1, 1/2, 1/4 ...
normalised to sum to 1 (nnU-Net's). The gradient then reaches the deep layers directly, not only through the
whole decoder.

The heads are not part of what is served: :func:`served_network` is the U-Net itself, with the same layers and
weights, and the bundle holds its weights only, so the manifest's architecture, serving, ``evaluate`` and
``predict`` do not change. Validation during training runs the served network too.
"""

from __future__ import annotations

from typing import Any

#: prefix of the heads' layer names: ``deep_supervision_<level>_logits`` and ``deep_supervision_<level>``
HEAD_PREFIX = "deep_supervision"


def max_heads(levels: int) -> int:
    """Decoder levels below full resolution that can carry a head: the decoder has ``levels - 1`` of them
    (``levels - 2`` below full resolution)."""
    return max(0, levels - 2)


def with_heads(network: Any, heads: int) -> Any:
    """A training model: ``network``'s input, its output first, then one head per decoder level ``1..heads``.

    ``network`` is a U-Net of :func:`brainscan.models.unet3d.build_unet3d` (plain or attention); the heads read
    its ``decoder_<level>_act2`` layers. The returned model shares ``network``'s layers and weights.

    Raises:
        ValueError: ``heads`` < 1, or the network has no decoder level ``heads`` below full resolution.
    """
    import keras
    from keras import layers

    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    names = {layer.name for layer in network.layers}
    missing = [f"decoder_{level}_act2" for level in range(1, heads + 1) if f"decoder_{level}_act2" not in names]
    if missing:
        raise ValueError(f"{network.name} has no decoder level for {heads} deep-supervision head(s): no {missing}")
    probabilities = network.get_layer("probabilities")
    activation = keras.activations.serialize(probabilities.activation)
    outputs = [network.outputs[0]]
    for level in range(1, heads + 1):
        features = network.get_layer(f"decoder_{level}_act2").output
        logits = layers.Conv3D(network.outputs[0].shape[-1], 1, name=f"{HEAD_PREFIX}_{level}_logits")(features)
        outputs.append(layers.Activation(activation, dtype="float32", name=f"{HEAD_PREFIX}_{level}")(logits))
    return keras.Model(network.input, outputs, name=network.name)


def served_network(model: Any) -> Any:
    """The network a bundle serves: ``model`` itself, or, for a training model of :func:`with_heads` (also one
    loaded back from a checkpoint), its first output without the heads (same layers, same weights)."""
    import keras

    if len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.outputs[0], name=model.name)


def loss_weights(heads: int) -> list[float]:
    """nnU-Net's weights: ``1/2**i`` for the full resolution (``i = 0``) and each head, normalised to sum to 1."""
    raw = [0.5**i for i in range(heads + 1)]
    return [w / sum(raw) for w in raw]


def head_losses(loss: Any, heads: int) -> list[Any]:
    """``loss`` for the full-resolution output, then ``loss`` on targets pooled by 2, 4 ... for each head."""
    from training.losses import DownsampledLoss

    return [loss, *(DownsampledLoss(loss, 2**level) for level in range(1, heads + 1))]


def with_target_copies(data: Any, copies: int) -> Any:
    """Batches ``(x, y)`` as ``(x, (y,) * copies)``: every output of a training model of :func:`with_heads` gets
    the full-resolution targets (each head's loss pools them). ``data`` is a ``tf.data.Dataset`` or a
    ``keras.utils.PyDataset`` (the backends without tf.data); the same kind comes back."""
    import keras

    if isinstance(data, keras.utils.PyDataset):
        inner = data

        class TargetCopies(keras.utils.PyDataset):
            def __init__(self) -> None:
                super().__init__(workers=inner.workers, use_multiprocessing=inner.use_multiprocessing,
                                 max_queue_size=inner.max_queue_size)

            def __len__(self) -> int:
                return len(inner)

            def __getitem__(self, number: int) -> tuple[Any, tuple[Any, ...]]:
                x, y = inner[number]
                return x, (y,) * copies

            def on_epoch_begin(self) -> None:
                inner.on_epoch_begin()

            def on_epoch_end(self) -> None:
                inner.on_epoch_end()

        return TargetCopies()
    return data.map(lambda x, y: (x, (y,) * copies))

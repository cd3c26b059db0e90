"""The MONAI row of bench/segment.py: the same U-Net, in PyTorch, through MONAI's sliding_window_inference.

Runs in its own virtualenv (torch + monai; never a brainscan dependency):
    python3.11 -m venv .venv-monai && .venv-monai/bin/pip install torch==2.13.0 monai
bench/segment.py exports the bundle's weights (``weights.npz``, Keras layer names, channels-last
kernels) and the volumes to segment (``volumes.npz``), then runs this script with that venv's
python. It rebuilds the network layer for layer (Conv3D without bias, instance norm as GroupNorm with
one group per channel, LeakyReLU 0.01, 2x2x2 max-pool, 2x2x2 transposed convolution, 1x1x1 head),
checks that it matches the Keras output on the bundle's first window, and prints one JSON line:
``{"check_max_abs_diff": ..., "<volume>": {"seconds": [...], "windows": ...}, ...}``.
Plain U-Net only: the attention variant is not ported (bench/segment.py skips the row for it).
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(cout, cout, eps=1e-5)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(cout, cout, eps=1e-5)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, base: int, levels: int, output: str) -> None:
        super().__init__()
        widths = [base * 2**level for level in range(levels)]
        self.encoders = nn.ModuleList(Block(in_channels if i == 0 else widths[i - 1], w) for i, w in enumerate(widths))
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels - 1))
        self.decoders = nn.ModuleList(Block(2 * widths[i], widths[i]) for i in range(levels - 1))
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        self.pool = nn.MaxPool3d(2)
        self.output = output

    def forward(self, x):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for level in range(len(self.ups) - 1, -1, -1):
            x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], dim=1))
        logits = self.head(x)
        return torch.sigmoid(logits) if self.output == "sigmoid" else torch.softmax(logits, dim=1)


def load_keras_weights(model: UNet, weights: dict[str, np.ndarray]) -> None:
    """Copy Keras weights (``<layer>/<index>`` keys) into the torch modules."""

    def kernel(name: str) -> torch.Tensor:  # (kx, ky, kz, in, out) -> (out, in, kx, ky, kz); same for transposed
        return torch.from_numpy(np.ascontiguousarray(weights[name].transpose(4, 3, 0, 1, 2), dtype=np.float32))

    def vector(name: str) -> torch.Tensor:
        return torch.from_numpy(weights[name].astype(np.float32))

    def block(module: Block, prefix: str) -> None:
        for i in (1, 2):
            getattr(module, f"conv{i}").weight.data = kernel(f"{prefix}_conv{i}/0")
            getattr(module, f"norm{i}").weight.data = vector(f"{prefix}_norm{i}/0")
            getattr(module, f"norm{i}").bias.data = vector(f"{prefix}_norm{i}/1")

    for level, encoder in enumerate(model.encoders):
        block(encoder, f"encoder_{level}")
    for level, (up, decoder) in enumerate(zip(model.ups, model.decoders)):
        up.weight.data = kernel(f"decoder_{level}_up/0")
        up.bias.data = vector(f"decoder_{level}_up/1")
        block(decoder, f"decoder_{level}")
    model.head.weight.data = kernel("logits/0")
    model.head.bias.data = vector("logits/1")


def mirrored(x: torch.Tensor, infer, mirror_axes: list[int]) -> torch.Tensor:
    """The mean of ``infer`` over every subset of the spatial ``mirror_axes`` flipped (as brainscan's
    mirroring TTA does: 2^k passes), each output flipped back."""
    dims = [axis + 2 for axis in mirror_axes]  # (N, C, X, Y, Z)
    subsets = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    total = None
    for flip in subsets:
        out = infer(torch.flip(x, flip) if flip else x)
        out = torch.flip(out, flip) if flip else out
        total = out if total is None else total + out
    return total / len(subsets)


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    weights = dict(np.load(spec["weights"]))
    volumes = dict(np.load(spec["volumes"]))
    model = UNet(spec["in_channels"], spec["num_classes"], spec["base_filters"], spec["levels"], spec["output"]).eval()
    load_keras_weights(model, weights)
    patch = tuple(spec["patch_size"])
    result: dict = {"torch": torch.__version__}
    with torch.inference_mode():
        window = torch.from_numpy(volumes["check_input"]).permute(0, 4, 1, 2, 3)
        ours = model(window).permute(0, 2, 3, 4, 1).numpy()
        result["check_max_abs_diff"] = float(np.abs(ours - volumes["check_output"]).max())
        for name in spec["run"]:
            x = torch.from_numpy(volumes[name]).permute(3, 0, 1, 2)[None]
            seconds = []
            for _ in range(spec["repeats"]):
                started = time.perf_counter()
                mirrored(x, lambda v: sliding_window_inference(v, patch, spec["sw_batch_size"], model,
                                                               overlap=spec["overlap"], mode="gaussian"),
                         spec.get("mirror_axes") or [])
                seconds.append(time.perf_counter() - started)
            result[name] = {"seconds": seconds, "shape": list(volumes[name].shape[:3])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

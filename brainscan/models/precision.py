"""The arithmetic a segmentation network runs in when it serves: ``float32`` or ``bfloat16``.

A U-Net's forward pass is almost all Conv3D. On a CPU with bfloat16 dot-product instructions
(AVX512_BF16 or AMX, reported in ``/proc/cpuinfo``) oneDNN runs those convolutions in bfloat16 about
1.5x faster than in float32 (``bench/segment.py`` prints both); elsewhere bfloat16 is emulated and
slower. So the default, ``auto``, picks bfloat16 only where the CPU has it. The shipped U-Nets were
trained in mixed bfloat16 and their training validation ran in it, so this changes no mask materially
(``bench/segment.py --precision`` measures both).

The weights stay float32; ``bfloat16`` is Keras' ``mixed_bfloat16`` policy (bfloat16 compute, float32
variables), with the probabilities layer in float32. Every path that loads a bundle for segmentation
(the worker, ``evaluate``, ``predict``, the benches) resolves the same setting, so they agree with
each other on one machine.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("auto", "float32", "bfloat16")
#: CPU flags (``/proc/cpuinfo``) of native bfloat16 matrix arithmetic
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises native bfloat16 arithmetic (``False`` where that cannot be read)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag in line.split(":", 1)[-1].split() for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(setting: str | None = "auto", cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``"float32"`` or ``"bfloat16"`` for a setting of :data:`PRECISIONS` (``None`` is ``auto``).

    Raises:
        ValueError: a setting that is not one of :data:`PRECISIONS`.
    """
    setting = "auto" if setting is None else setting
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return "bfloat16" if cpu_has_bf16(cpuinfo) else "float32"
    return setting


def dtype_policy(precision: str) -> str:
    """The Keras dtype policy a network is built under for a resolved precision."""
    if precision not in _POLICIES:
        raise ValueError(f"a resolved precision is one of {list(_POLICIES)}, got {precision!r}")
    return _POLICIES[precision]


__all__ = ["BF16_CPU_FLAGS", "PRECISIONS", "cpu_has_bf16", "dtype_policy", "resolve_precision"]

"""The CPU features that decide inference speed, read from the kernel (no torch, no OpenVINO).

The development and CI machines change processor from one day to the next (an AMD EPYC with
AVX-512 VNNI and BF16, an Intel Xeon with AMX), so the optimizer discovers what the CPU offers
instead of assuming it, and the report says which features were there and which each variant
used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

# /proc/cpuinfo flag -> the name the report uses, in the order the report lists them.
FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx_vnni": "AVX-VNNI",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (empty where /proc/cpuinfo cannot be read)."""
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def speed_features(flags: frozenset[str]) -> dict[str, bool]:
    """Present or absent, for each feature in FEATURES."""
    return {name: flag in flags for flag, name in FEATURES.items()}


def int8_path(flags: frozenset[str]) -> str:
    """The instructions an INT8 GEMM/convolution kernel can use on this CPU, best first."""
    if "amx_int8" in flags:
        return "AMX-INT8"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    return "AVX2 (no VNNI: INT8 gains little)" if "avx2" in flags else "none"


def bf16_path(flags: frozenset[str]) -> str | None:
    """The native BF16 instructions, or None where BF16 would only be emulated."""
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def fp32_path(flags: frozenset[str]) -> str:
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "SSE"

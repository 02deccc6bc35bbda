"""Device and precision selection shared by every training stage."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from e4srec.errors import E4SRecError

# /proc/cpuinfo flags that decide how fast bf16 and fp32 matmuls run on a CPU.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a cuda request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise E4SRecError(f"device={name!r}: this torch has no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise E4SRecError(f"device={name!r}: expected cpu, cuda, cuda:N or auto") from None


CPUINFO = Path("/proc/cpuinfo")


def _first_cpu(cpuinfo: Path) -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as {key: value}; empty where the file is missing."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():  # the block ends at its blank line
                break
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model name from /proc/cpuinfo with its family and model numbers, else what `platform` knows.

    Virtual machines often show only "AMD EPYC" or "Intel(R) Xeon(R) Processor"; the numbers tell the
    generation apart (AMD family 25 is Zen 3/4, family 26 is Zen 5), and the speed of bf16 with it.
    """
    fields = _first_cpu(cpuinfo)
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def cpu_flags(cpuinfo: Path = CPUINFO) -> list[str]:
    """Which of CPU_FLAGS this CPU reports (empty where /proc/cpuinfo is missing)."""
    have = set(_first_cpu(cpuinfo).get("flags", "").split())
    return [f for f in CPU_FLAGS if f in have]


def cpu_has_bf16_units() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX), as torch sees it.

    Without them torch emulates bf16 and a bf16 backbone trains about 20x slower than fp32; with them
    bf16 matmuls run about 2x (AVX512-BF16) to 5-10x (AMX) faster than fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu: guard them
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# glibc's mallopt parameters (malloc.h), their defaults, and what a user sets them with at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
               "GLIBC_TUNABLES", "LD_PRELOAD")


def _glibc() -> ctypes.CDLL | None:
    """glibc with mallopt and malloc_trim, or None (another OS or C library, or the user's own settings)."""
    if platform.system() != "Linux" or any(os.environ.get(name) for name in _MALLOC_ENV):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block glibc keeps freed memory for the next allocation instead of returning it.

    glibc serves every allocation above 32 MiB with its own mmap and unmaps it when freed, so a CPU
    training step that builds one (SASRec's cross-entropy logits over all items: up to 90 MB) faults it
    in again, page by page, on every step; on a 2-core VM a third of the CPU time went to the kernel.
    Inside the block no allocation gets an mmap of its own and the heap is never trimmed; on leaving,
    glibc's defaults come back (fixed, not adaptive) and the unused memory is returned. Yields whether
    it changed anything: not off glibc, not when disabled, and not where the user chose (a MALLOC_*_
    variable, GLIBC_TUNABLES, LD_PRELOAD).
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    changed = bool(libc.mallopt(_M_MMAP_MAX, 0)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield changed
    finally:  # also after a half-applied change
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)

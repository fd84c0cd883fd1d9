"""
Freed host memory goes back to the operating system during the save (glibc only).

glibc serves allocations above its mmap threshold with their own mappings, which
``free`` unmaps, and smaller ones from its heap, which keeps freed memory for
reuse. The threshold starts at 128 KiB but rises to the size of every mapped
block that is freed, up to 32 MiB, so after the first freed weight matrix the
next ones come from the heap and stay resident once freed. Saving a quantized
model packs every quantized module in turn (new packed tensors, the float
weight freed): on a 48-layer model that left 0.3 of the model's bytes resident
and made the save the run's peak (BENCHMARKS.md, "Memory, 2026-12-05"). Fixing
the threshold from the start of a run removed that, but made a CPU oneshot 10%
slower (every large temporary then maps and faults fresh pages), so it is done
at the save only: :func:`ream_modifiers.saving.install_save_hook` calls
:func:`release_freed_memory_eagerly` first. Set :data:`ENABLED` to False to
keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import sys

from loguru import logger

__all__ = ["ENABLED", "MMAP_THRESHOLD", "release_freed_memory_eagerly"]

ENABLED = True
# glibc's initial threshold; blocks above it are mapped and unmapped on free
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


def release_freed_memory_eagerly(threshold: int = MMAP_THRESHOLD) -> bool:
    """
    Return the heap's free memory to the system (``malloc_trim``) and fix glibc's
    mmap threshold at ``threshold`` bytes for the rest of the process (what the
    ``MALLOC_MMAP_THRESHOLD_`` environment variable does at start-up), so that
    every block above it freed from now on is unmapped at once. Tensors on an
    accelerator are not affected.

    :param threshold: allocation size in bytes from which blocks are mapped
    :return: whether it took effect (False when :data:`ENABLED` is False, off
        Linux, or without glibc)
    """
    if not ENABLED or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if applied:
        logger.debug(f"glibc heap trimmed, mmap threshold fixed at {threshold} bytes")
    return applied

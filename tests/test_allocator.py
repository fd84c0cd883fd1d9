import subprocess
import sys

import pytest

# a fresh interpreter frees 64 touched 1 MiB blocks, each followed by a live
# 192 KiB block (too large for a free list, so it is carved after the 1 MiB one
# and keeps it from merging into the top of the heap, which glibc trims), after
# one freed 8 MiB block has raised glibc's dynamic mmap threshold to 8 MiB
_PROBE = """
import ctypes, sys
from ream_modifiers.allocator import release_freed_memory_eagerly

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    assert release_freed_memory_eagerly()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
before = anon()
blocks, pins = [], []
for _ in range(64):
    block = libc.malloc(1 << 20)
    ctypes.memset(block, 1, 1 << 20)
    blocks.append(block)
    pins.append(libc.malloc(192 << 10))
for block in blocks:
    libc.free(block)
print(anon() - before)
"""


def _retained(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_return_to_the_system_with_the_fixed_threshold():
    pins = 64 * (192 << 10)  # alive in both runs
    assert _retained("default") > pins + (48 << 20)  # kept in glibc's heap
    assert _retained("fixed") < pins + (4 << 20)


def test_disabled_leaves_glibc_alone(monkeypatch):
    from ream_modifiers import allocator

    monkeypatch.setattr(allocator, "ENABLED", False)
    assert not allocator.release_freed_memory_eagerly()


def test_our_save_hook_returns_freed_memory_before_saving(
    load_tiny, calibration, tmp_path, monkeypatch
):
    from ream_modifiers import REAPModifier, saving
    from tests.conftest import run_modifier

    model, tokenizer, _ = load_tiny("qwen3_moe")
    run_modifier(
        model, tokenizer, calibration("qwen3_moe"), REAPModifier(sparsity=0.25)
    )
    calls = []
    monkeypatch.setattr(
        saving, "release_freed_memory_eagerly", lambda: calls.append("called")
    )
    model.save_pretrained(tmp_path / "out")
    assert calls == ["called"]

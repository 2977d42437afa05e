"""Host memory readings: each phase's peak is its own, and malloc's free bytes are counted."""

import json
import subprocess
import sys

import pytest

from cnn_lab.runtime import memory

# Frees a touched 200 MB block inside one phase; with "keep", malloc holds it after free.
PHASES = """
import ctypes, json, sys
from cnn_lab.runtime import host, memory
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
phases = memory.Phases()
phases.end("start")
block = libc.malloc(200 * 2**20)
ctypes.memset(block, 1, 200 * 2**20)
libc.free(block)
phases.end("block")
phases.end("after")
print(json.dumps(phases.phases))
"""


def phases(mode: str) -> dict:
    command = [sys.executable, "-c", PHASES, mode]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not memory.reset_peak(), reason="the OS cannot reset the peak (non-Linux)")
def test_a_block_freed_within_a_phase_counts_in_its_peak_only():
    found = phases("default")  # glibc unmaps a block this large when it is freed
    block, after = found["block"], found["after"]
    assert block["peak_mb"] >= found["start"]["resident_mb"] + 190
    assert block["resident_mb"] < block["peak_mb"] - 190
    assert after["peak_mb"] < block["peak_mb"] - 190


@pytest.mark.skipif(memory.allocator_free_mb() is None, reason="no glibc mallinfo2")
def test_malloc_free_bytes_count_what_keep_freed_memory_holds():
    found = phases("keep")
    assert found["block"]["allocator_free_mb"] >= found["start"]["allocator_free_mb"] + 190
    assert found["block"]["resident_mb"] >= found["start"]["resident_mb"] + 190

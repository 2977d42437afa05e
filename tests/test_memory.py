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


# Imports what training, the benchmark, load_run and predict import, and writes TensorBoard
# scalars; prints the heavy modules that came with them.
HEAVY_IMPORTS = """
import json, sys
import cnn_lab.saved_run, cnn_lab.tools.benchmark, cnn_lab.tools.predict, cnn_lab.train
from cnn_lab.metric_writer import MetricWriter
from cnn_lab.runtime import memory
writer = MetricWriter(sys.argv[1])
writer.write(step=1, epoch=0.5, split="train", metrics={"loss": 1.0})
print(json.dumps([m for m in memory.HEAVY_MODULES if m in sys.modules]))
"""


def test_training_and_its_tools_import_neither_tensorflow_nor_torch(tmp_path):
    command = [sys.executable, "-c", HEAVY_IMPORTS, str(tmp_path)]
    found = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    # TF only reads data (cnn_lab.data imports it when it must); tensorboardX would import
    # torch where it is installed.
    assert "tensorflow" not in found and "torch" not in found
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))

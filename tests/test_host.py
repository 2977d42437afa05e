"""With keep_freed_memory, a block freed and allocated again costs no new page faults."""

import subprocess
import sys

# Allocates, touches and frees 64 MB twice (as XLA does a step's buffers); prints the page
# faults of the second round.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from cnn_lab.runtime import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for round in range(2):  # malloc and free directly: numpy would ask for huge pages itself
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64_000_000)
    ctypes.memset(block, 1, 64_000_000)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    command = [sys.executable, "-c", SECOND_ROUND_FAULTS, mode]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_freed_memory_is_reused_without_page_faults():
    pages = 64_000_000 // 4096
    assert second_round_faults("default") > pages // 2  # glibc unmapped the block
    assert second_round_faults("keep") < pages // 20

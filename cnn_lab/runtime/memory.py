"""Where a process's host memory goes: resident and peak memory per phase, and malloc's free bytes.

Linux reports the resident set (VmRSS) and its high-water mark (VmHWM) in /proc/self/status;
writing 5 to /proc/self/clear_refs resets the mark, so each phase's peak is its own. glibc's
mallinfo2 says how much of that memory malloc holds free for reuse (what
`config.train.keep_freed_memory` keeps instead of giving back).
"""

import contextlib
import ctypes
import resource
import sys
from pathlib import Path

# Modules whose import alone costs tens to hundreds of MB: reported when a process holds them.
HEAVY_MODULES = ("tensorflow", "tensorflow_datasets", "torch")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (reported in kB) in MB; None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def resident_mb() -> float:
    """The process's resident memory now, in MB (its peak so far where the OS reports no more)."""
    resident = _status_mb("VmRSS")
    return peak_mb() if resident is None else resident


def peak_mb() -> float:
    """The process's peak resident memory since it started or since `reset_peak`, in MB."""
    peak = _status_mb("VmHWM")
    # Linux's ru_maxrss is in kB, macOS's in bytes; only Linux resets it.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if peak is not None else maxrss / (1024 if sys.platform == "linux" else 2**20)


def reset_peak() -> bool:
    """Start a new peak at the current resident memory; False where the OS cannot (non-Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _MallInfo2(ctypes.Structure):
    # struct mallinfo2 of glibc's malloc.h (glibc 2.33 and later).
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def allocator_free_mb() -> float | None:
    """MB that malloc holds free for reuse (all arenas); None without glibc's mallinfo2."""
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.fordblks + info.fsmblks) / 2**20


def _minor_page_faults() -> int:
    """Page faults of the process so far that were served without reading from disk."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Phases:
    """Resident memory at the end of each phase of a process, its peak during the phase,
    malloc's free memory at its end and the page faults during it (each costs a zeroed page).

    The first phase runs from the process's start to the first `end`; call `end(name)` as
    each phase finishes, then `breakdown()`.
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float | None]] = {}
        self._faults = _minor_page_faults()

    def end(self, name: str) -> None:
        """Record phase `name`, ending now, and start the next one."""
        self.phases[name] = {
            "resident_mb": resident_mb(),
            "peak_mb": peak_mb(),
            "allocator_free_mb": allocator_free_mb(),
            "page_faults": _minor_page_faults() - self._faults,
        }
        self._faults = _minor_page_faults()
        # Without a reset, each phase's peak is the process's peak so far.
        reset_peak()

    def breakdown(self, keep_freed_memory: bool) -> dict:
        """The phases, the process's peak and the heavy modules imported."""
        return {
            "phases": self.phases,
            "peak_mb": max(p["peak_mb"] for p in self.phases.values()),
            "keep_freed_memory": keep_freed_memory,
            "heavy_modules": [m for m in HEAVY_MODULES if m in sys.modules],
        }


def format_breakdown(breakdown: dict) -> str:
    """Lines a person can read: each phase's resident, peak and malloc-free MB."""
    lines = [
        f"  {'host memory MB':<22}{'resident':>10}{'peak':>10}{'malloc free':>12}{'page faults':>12}"
    ]
    for name, phase in breakdown["phases"].items():
        free = phase["allocator_free_mb"]
        lines.append(
            f"    {name:<20}{phase['resident_mb']:>10.0f}{phase['peak_mb']:>10.0f}"
            f"{'?' if free is None else f'{free:.0f}':>12}{phase['page_faults']:>12}"
        )
    lines.append(
        f"    keep_freed_memory={breakdown['keep_freed_memory']}; heavy modules imported: "
        f"{', '.join(breakdown['heavy_modules']) or 'none'}"
    )
    return "\n".join(lines)

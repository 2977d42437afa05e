"""Where a compiled step's time goes: a profiler trace of a few calls, summed per kind of op.

`python -m cnn_lab.benchmark --config=... --trace=DIR` writes the trace of a few train steps
to DIR (open it in Perfetto or TensorBoard) and prints this breakdown. XLA:CPU names each op
it runs after its instruction in the optimized HLO, so the trace's events are matched against
that program (an accelerator's kernels are named otherwise: read its trace in a viewer). A
fusion's kind is its name without the number (`add_maximum_fusion`; `ynn_fusion`: the
reductions XLA:CPU hands to YNNPACK), a custom call's kind its target
(`cnn_lab_onednn_conv_backward`). An op that contains others (a while loop) counts them too.
"""

import collections
import gzip
import json
import re
import time
from pathlib import Path

import jax

# `%name = shape opcode(...)` lines of an HLO module, with the custom call's target if any.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_NUMBER = re.compile(r"\.\d+$")


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of an optimized HLO module's text."""
    kinds = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            target = _TARGET.search(line)
            kinds[match.group(1)] = target.group(1) if target else _NUMBER.sub("", match.group(1))
    return kinds


def _trace_events(directory: Path) -> list[dict]:
    """The complete ("X") events of the newest Perfetto trace under `directory`."""
    traces = sorted(directory.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"jax.profiler wrote no .trace.json.gz under {directory}.")
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X"]


def trace_step(call, steps: int, directory: str | Path, hlo_text: str) -> dict:
    """Trace `steps` calls of `call` (a compiled step whose optimized HLO is `hlo_text`) into
    `directory`; return the wall ms per step and, per kind of op, ms and calls per step.

    `call` returns something to block on; it runs once before the trace so that the traced
    calls are warm.
    """
    directory = Path(directory)
    jax.block_until_ready(call())
    jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    step_ms = (time.perf_counter() - start) * 1000 / steps
    jax.profiler.stop_trace()
    kinds = op_kinds(hlo_text)
    milliseconds, calls = collections.Counter(), collections.Counter()
    for event in _trace_events(directory):
        kind = kinds.get(event["name"])
        if kind is not None:
            milliseconds[kind] += event["dur"] / 1000 / steps  # Trace durations are in µs.
            calls[kind] += 1 / steps
    return {
        "step_ms": step_ms,
        "ops": {kind: {"ms": ms, "calls": calls[kind]} for kind, ms in milliseconds.most_common()},
    }


def format_trace(trace: dict, rows: int = 15) -> str:
    """The breakdown as a table: the costliest kinds of op first."""
    step_ms = trace["step_ms"]
    lines = [
        f"train step {step_ms:.1f} ms (traced); time per kind of op, summed over XLA's threads:",
        f"  {'op':<40} {'ms/step':>8} {'calls':>6} {'% of step':>9}",
    ]
    for kind, figures in list(trace["ops"].items())[:rows]:
        lines.append(
            f"  {kind:<40} {figures['ms']:>8.2f} {figures['calls']:>6.0f} "
            f"{100 * figures['ms'] / step_ms:>9.1f}"
        )
    summed = sum(figures["ms"] for figures in trace["ops"].values())
    lines.append(f"  {'all ops':<40} {summed:>8.2f} {'':>6} {100 * summed / step_ms:>9.1f}")
    return "\n".join(lines)

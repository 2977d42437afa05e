"""The runs a launcher starts stop with it: SIGTERM to the launcher reaches each of them.

On a shared machine `kill -TERM <launcher pid>` then stops one sweep and only it: each
running train process saves the step it is at and exits 75, no further run starts, and the
launcher exits 75 once they have; rerunning its command resumes where they stopped.
"""

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

# cnn_lab.train's exit code after saving on SIGTERM ("temporary failure, run me again").
# Spelled out, not imported: importing cnn_lab.train would load JAX into a launcher.
STOPPED_EXIT_CODE = 75


class Children:
    """The processes a launcher runs (from any thread), and the stop that reaches them all."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self._running: set[subprocess.Popen] = set()

    @contextlib.contextmanager
    def stopping_on_sigterm(self) -> Iterator[None]:
        """Within the block, SIGTERM to this process calls `stop` (signals reach the main
        thread only); the handler before it is back after."""
        previous = signal.signal(signal.SIGTERM, lambda *_: self.stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Send every running child SIGTERM; start no other."""
        self.stopped.set()
        for process in list(self._running):
            process.send_signal(signal.SIGTERM)

    def exit_if_stopped(self) -> None:
        """After a stop: say how to resume, and exit 75."""
        if self.stopped.is_set():
            print(
                "Stopped by SIGTERM: the running trainings saved their step. Rerun the same "
                "command to resume.",
                file=sys.stderr,
            )
            sys.exit(STOPPED_EXIT_CODE)

    def run(self, line: Sequence[str], **popen_kwargs) -> int | None:
        """Run `line` to its end and return its exit code; None, running nothing, once stopped."""
        if self.stopped.is_set():
            return None
        process = subprocess.Popen(line, **popen_kwargs)
        self._running.add(process)
        if self.stopped.is_set():  # A stop between the check and the add missed this one.
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait()
        finally:
            self._running.discard(process)

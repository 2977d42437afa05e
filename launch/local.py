"""Start N processes of one multi-process run on this machine, for debugging multi-host code.

    python -m launch.local --num_processes=2 --cpu_devices_per_process=4 -- \\
        --config=configs/lenet_digits.py:smoke --workdir=runs/two_hosts

Each process runs `python -m cnn_lab.train <args after -->` with
--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i, so together
they form one run over every process's devices. Their output is printed line by line with a
"[i]" prefix. If one process fails, the others are stopped (they would wait for it at the
next collective), and the launcher exits with that process's exit code.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from cnn_lab.launch import command

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Seconds the other processes get to exit after SIGTERM before they are killed.
STOP_GRACE_SECONDS = 10


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], cpu_devices: int) -> dict[str, str]:
    """`base` with `cpu_devices` fake CPU devices per process (0: the environment unchanged)."""
    if not cpu_devices:
        return dict(base)
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return {
        **base,
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={cpu_devices}"]),
        "JAX_PLATFORMS": "cpu",
    }


def commands(num_processes: int, port: int, train_args: list[str]) -> list[list[str]]:
    """One `python -m cnn_lab.train` command line per process."""
    return [
        [
            sys.executable,
            *command.ENTRY_POINT,
            *train_args,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
        ]
        for i in range(num_processes)
    ]


def _forward(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL those that outlive the grace time."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in processes:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(cmds: list[list[str]], env: dict[str, str]) -> int:
    """Run `cmds` together; 0 if all succeed, else the exit code of the first to fail."""
    processes, threads = [], []
    for i, cmd in enumerate(cmds):
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        processes.append(p)
        threads.append(threading.Thread(target=_forward, args=(p.stdout, f"[{i}] "), daemon=True))
        threads[-1].start()
    failed = 0
    try:
        while any(p.poll() is None for p in processes):
            failed = next((p.returncode for p in processes if p.poll()), 0)
            if failed:
                break
            time.sleep(0.2)
        failed = failed or next((p.returncode for p in processes if p.returncode), 0)
    except KeyboardInterrupt:
        failed = 130
    finally:
        _stop(processes)
        for t in threads:
            t.join(timeout=5)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Parse the launcher's options (train arguments follow `--`) and run or print the commands."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python -m launch.local [options] -- <cnn_lab.train arguments>",
    )
    parser.add_argument("--num_processes", type=int, default=2, help="Processes to start.")
    parser.add_argument(
        "--cpu_devices_per_process",
        type=int,
        default=0,
        help="Fake CPU devices per process (XLA_FLAGS, JAX_PLATFORMS=cpu); 0: real devices.",
    )
    parser.add_argument("--port", type=int, default=0, help="Coordinator port; 0: a free one.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
    parser.add_argument("train_args", nargs="*", help="Arguments of python -m cnn_lab.train.")
    args = parser.parse_args(argv)
    if args.num_processes < 1 or args.cpu_devices_per_process < 0:
        parser.error(
            f"--num_processes={args.num_processes} must be at least 1 and "
            f"--cpu_devices_per_process={args.cpu_devices_per_process} at least 0."
        )
    cmds = commands(args.num_processes, args.port or free_port(), args.train_args)
    env = process_env(dict(os.environ), args.cpu_devices_per_process)
    if args.dry_run:
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items()))
        for cmd in cmds:
            print(" ".join(filter(None, [prefix, shlex.join(cmd)])))
        return 0
    return run(cmds, env)


if __name__ == "__main__":
    sys.exit(main())

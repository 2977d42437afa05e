"""Kill a run 20 times at random moments (training, saving, deleting) and resume each time."""

import os
import re
import subprocess
import time

import chex
import numpy as np
import pytest
from test_checkpoint import (  # noqa: F401  (fixtures data_dir and uninterrupted)
    ROOT,
    _assert_bitwise_equal,
    _command,
    _config,
    _final_params,
    _run,
    _saved_steps,
    data_dir,
    uninterrupted,
)

from cnn_lab import checkpoint
from cnn_lab.train import train_and_evaluate

pytestmark = pytest.mark.slow  # Dozens of training processes, killed and resumed.

KILLS = 20
KEEP = 2


def test_twenty_sigkills_lose_nothing_and_end_bitwise_exact(tmp_path, data_dir, uninterrupted):
    rng = np.random.default_rng(2026)
    workdir = tmp_path / "soak"
    resumed_at = []
    for _ in range(KILLS):
        before = max(_saved_steps(workdir), default=0)
        proc = subprocess.Popen(
            _command(workdir, data_dir, **{"checkpoint.every_steps": 1, "checkpoint.keep": KEEP}),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while max(_saved_steps(workdir), default=0) <= before and proc.poll() is None:
            assert time.time() < deadline, "a resumed run made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        assert "Traceback" not in stderr, stderr[-3000:]
        match = re.search(r"resuming at step (\d+)", stdout)
        resumed_at.append(int(match.group(1)) if match else 0)
        assert resumed_at[-1] == before  # nothing lost beyond the last save
        # Orbax writes the new step before deleting the oldest: at most KEEP + 1 at a kill.
        assert len(_saved_steps(workdir)) <= KEEP + 1
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0
    out = _run(workdir, data_dir, **{"checkpoint.every_steps": 1, "checkpoint.keep": KEEP})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_saved_steps(workdir)) == KEEP
    assert not list((workdir / checkpoint.LATEST_DIR).glob("*tmp*"))
    _assert_bitwise_equal(_final_params(workdir), _final_params(uninterrupted))


def test_resume_on_another_device_count(tmp_path, data_dir):
    """8 devices -> 1 device and 1 -> 8: same data order, results equal within tolerance.

    SGD, whose update is linear in the gradient, so reduction-order differences between
    device counts (about 1e-6) stay that small instead of being rescaled as by Adam.
    """
    # XLA's convolution on 1 device too (auto would pick a CPU kernel): only the device count
    # varies.
    sgd = {
        "optimizer.name": "sgd",
        "optimizer.learning_rate": 0.05,
        "model.conv_implementation": "xla",
    }

    def in_process(workdir, epochs):
        config = _config(data_dir, num_epochs=epochs)
        config.checkpoint.every_steps = 4
        config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.05
        train_and_evaluate(config, workdir, allow_config_changes=("train.num_epochs",))

    def one_device(workdir, epochs):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        out = subprocess.run(
            _command(
                workdir,
                data_dir,
                "--allow_config_changes=train.num_epochs",
                **{"train.num_epochs": epochs, **sgd},
            ),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "1 device(s)" in out.stdout
        return out.stdout

    for epochs in (1, 2):
        in_process(tmp_path / "8to8", epochs)
    in_process(tmp_path / "8to1", 1)
    assert "resuming at step 16" in one_device(tmp_path / "8to1", 2)
    one_device(tmp_path / "1to8", 1)
    in_process(tmp_path / "1to8", 2)
    reference = _final_params(tmp_path / "8to8")
    for name in ("8to1", "1to8"):
        chex.assert_trees_all_close(_final_params(tmp_path / name), reference, atol=1e-4)

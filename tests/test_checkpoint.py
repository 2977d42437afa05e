"""Checkpoints: exact resume after SIGKILL (once, and 8 times in a row at random moments), SIGTERM,
damaged steps, NaN guard, config changes, another device count."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

import cnn_lab
from cnn_lab import checkpoint
from cnn_lab.configs import lenet_digits
from cnn_lab.data import loading
from cnn_lab.train import PREEMPTED_EXIT_CODE, train_and_evaluate

ROOT = Path(lenet_digits.__file__).parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    loading.num_classes("digits", data_dir=path)  # prepare once for every subprocess
    return path


def _overrides(data_dir, **extra):
    """A 3-epoch run of 16 steps per epoch, saving every 4 steps."""
    values = {
        "data.data_dir": data_dir,
        "train.batch_size": 32,
        "train.num_epochs": 3,
        "checkpoint.every_steps": 4,
        "checkpoint.keep": 2,
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def _command(workdir, data_dir, *extra_flags, **extra):
    return [
        sys.executable,
        "-m",
        "cnn_lab.train",
        "--config=configs/lenet_digits.py:smoke",
        f"--workdir={workdir}",
        *_overrides(data_dir, **extra),
        *extra_flags,
    ]


def _run(workdir, data_dir, *extra_flags, **extra):
    out = subprocess.run(
        _command(workdir, data_dir, *extra_flags, **extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out


def _saved_steps(workdir) -> list[int]:
    directory = Path(workdir) / checkpoint.LATEST_DIR
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _final_params(workdir):
    _, variables, _ = cnn_lab.load_run(workdir, "latest")
    return jax.device_get(variables["params"])


def _assert_bitwise_equal(a, b):
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, a, b))
    assert leaves and all(leaves)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = _run(workdir, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _start_and_kill(workdir, data_dir, rng, sig=signal.SIGKILL):
    """Start a run, wait until it makes progress past its resume point, then kill it."""
    before = max(_saved_steps(workdir), default=-1)
    proc = subprocess.Popen(
        _command(workdir, data_dir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while max(_saved_steps(workdir), default=-1) <= before and proc.poll() is None:
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))  # a random moment: training, saving or deleting
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, data_dir, uninterrupted):
    returncode, _ = _start_and_kill(tmp_path, data_dir, np.random.default_rng(0))
    assert returncode == -signal.SIGKILL
    assert max(_saved_steps(tmp_path)) < 48  # killed before the end
    out = _run(tmp_path, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at step" in out.stdout, out.stderr[-3000:]
    _assert_bitwise_equal(_final_params(tmp_path), _final_params(uninterrupted))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_75(tmp_path, data_dir):
    returncode, stderr = _start_and_kill(
        tmp_path, data_dir, np.random.default_rng(1), signal.SIGTERM
    )
    assert returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    saved = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])
    assert max(_saved_steps(tmp_path)) == saved
    _, variables, _ = cnn_lab.load_run(tmp_path, saved)
    assert variables["params"]


def _damage_newest(workdir, how):
    step = max(_saved_steps(workdir))
    step_dir = Path(workdir) / checkpoint.LATEST_DIR / str(step)
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 64)
    if how == "truncate":
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "half_deleted":  # as a kill during Orbax's garbage collection leaves it
        for f in files[: len(files) // 2]:
            f.unlink()
        for f in step_dir.rglob("_METADATA"):
            f.unlink()
    elif how == "altered":  # bytes flipped in place (bad disk, bad copy): files still open
        largest = max(files, key=lambda f: f.stat().st_size)
        data = bytearray(largest.read_bytes())
        for i in range(len(data) // 2, min(len(data) // 2 + 300, len(data))):
            data[i] ^= 0x5A
        largest.write_bytes(bytes(data))
    elif how == "digest_mismatch":  # values that decode to finite numbers, but not the saved ones
        path = step_dir / "_CHECKPOINT_METADATA"
        record = json.loads(path.read_text())
        digests = record["custom_metadata"]["cnn_lab_digest"]
        digests[next(p for p in digests if "params" in p)] ^= 1
        path.write_text(json.dumps(record))
    return step


@pytest.mark.parametrize("how", ["truncate", "half_deleted", "altered", "digest_mismatch"])
def test_damaged_newest_step_is_moved_aside_and_an_older_one_used(tmp_path, data_dir, how):
    shutil.copytree(_trained(tmp_path / "src", data_dir, num_epochs=1), tmp_path / "run")
    workdir = tmp_path / "run"
    older = _saved_steps(workdir)[-2]
    damaged = _damage_newest(workdir, how)
    with pytest.warns(UserWarning, match=f"step {damaged}.*moved it"):
        results = train_and_evaluate(
            _config(data_dir, num_epochs=2), workdir, allow_config_changes=("train.num_epochs",)
        )
    assert results["test"]["count"] == 256
    broken = list((workdir / checkpoint.BROKEN_DIR).iterdir())
    assert [p.name.split("-")[1] for p in broken] == [str(damaged)]
    assert older < damaged
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "test"


def test_no_valid_checkpoint_is_a_clear_error_not_a_crash_loop(tmp_path, data_dir):
    workdir = _trained(tmp_path, data_dir, num_epochs=1)
    for step_dir in (workdir / checkpoint.LATEST_DIR).glob("[0-9]*"):
        for f in step_dir.rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    with (
        pytest.warns(UserWarning, match="moved it"),
        pytest.raises(checkpoint.CheckpointError, match=r"None of the checkpoint steps \[16, 12\]"),
    ):
        train_and_evaluate(_config(data_dir, num_epochs=1), workdir)
    assert len(list((workdir / checkpoint.BROKEN_DIR).iterdir())) == 2
    results = train_and_evaluate(_config(data_dir, num_epochs=1), workdir)  # rerun: afresh
    assert results["test"]["count"] == 256


def _config(data_dir, **train):
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.train.batch_size = 32
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 2
    for k, v in train.items():
        config.train[k] = v
    return config


def _trained(workdir, data_dir, **train):
    train_and_evaluate(_config(data_dir, **train), workdir)
    return Path(workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = _trained(tmp_path, data_dir, num_epochs=1)
    good = _saved_steps(workdir)
    config = _config(data_dir, num_epochs=2)
    config.optimizer.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step \d+"):
        train_and_evaluate(
            config, workdir, allow_config_changes=("optimizer.learning_rate", "train.num_epochs")
        )
    assert _saved_steps(workdir) == good
    _, variables, _ = cnn_lab.load_run(workdir, "latest")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_resuming_with_another_config_names_the_differing_keys(tmp_path, data_dir):
    workdir = _trained(tmp_path, data_dir, num_epochs=1)
    config = _config(data_dir, num_epochs=2)
    config.model.activation = "tanh"
    with pytest.raises(ValueError, match=r"model\.activation: 'relu' -> 'tanh'.*train\.num_epochs"):
        train_and_evaluate(config, workdir)
    config.model.activation = "relu"
    results = train_and_evaluate(config, workdir, allow_config_changes=("train.num_epochs",))
    assert results["test"]["count"] == 256


def test_checkpoint_of_another_model_is_refused_not_moved(tmp_path, data_dir):
    workdir = _trained(tmp_path, data_dir, num_epochs=1)
    (workdir / "config.json").unlink()  # so only the checkpoint itself can tell
    config = _config(data_dir, num_epochs=1)
    config.model.name = "mlp"
    del config.model["pooling"]
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this run"):
        train_and_evaluate(config, workdir)
    assert not (workdir / checkpoint.BROKEN_DIR).exists()


KILLS = 8
KEEP = 2


@pytest.mark.slow  # Dozens of training processes, killed and resumed.
def test_repeated_sigkills_lose_nothing_and_end_bitwise_exact(tmp_path, data_dir, uninterrupted):
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


@pytest.mark.slow
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
        config.model.conv_implementation = "xla"
        train_and_evaluate(config, workdir, allow_config_changes=("train.num_epochs",))

    def one_device(workdir, epochs):
        # The session's other XLA flags kept: only the device count differs from in_process.
        flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
        env = {**os.environ, "XLA_FLAGS": flags}
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
    provenance = json.loads((tmp_path / "8to1" / "config.json").read_text())["provenance"]
    assert (provenance["device_count"], provenance["resumed_at"]) == (1, 16)
    assert [p["device_count"] for p in provenance["earlier"]] == [8]  # What ran steps 0-16.
    reference = _final_params(tmp_path / "8to8")
    for name in ("8to1", "1to8"):
        chex.assert_trees_all_close(_final_params(tmp_path / name), reference, atol=1e-4)

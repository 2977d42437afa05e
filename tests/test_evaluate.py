"""Evaluation of saved runs: the CLI, its table and JSON, load_run, and bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import cnn_lab
from cnn_lab.configs import lenet_digits
from cnn_lab.data import streaming
from cnn_lab.tools.evaluate import evaluate_run
from cnn_lab.train import train_and_evaluate

ROOT = Path(lenet_digits.__file__).parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    results = train_and_evaluate(config, workdir)
    return workdir, results


def _evaluate(*args):
    return subprocess.run(
        [sys.executable, "-m", "cnn_lab.evaluate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prints_a_table_and_writes_json(run, tmp_path):
    workdir, results = run
    out = _evaluate(f"--workdir={workdir}", "--checkpoint=latest", "--split=test")
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((workdir / "eval_latest_test.json").read_text())
    # the final state is the latest checkpoint, so the numbers match the end of training
    assert written["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert written["count"] == 256 and written["step"] == 8
    assert len(written["per_class_accuracy"]) == 10
    assert f"{written['accuracy']:.4f}" in out.stdout and "per-class accuracy" in out.stdout


@pytest.mark.slow
def test_cli_evaluates_several_workdirs(run):
    workdir, _ = run
    out = _evaluate(
        f"--workdir={workdir}", f"--workdir={workdir}", "--checkpoint=best", "--split=val"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" raw ") == 2  # one raw-model row per run


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--workdir=/nonexistent/run"], "does not exist"),
        (["--checkpoint=12345"], "no checkpoint at step 12345"),
        (["--checkpoint=newest"], "use 'best', 'latest', a step number or 'snapshot:<step>'"),
    ],
)
def test_cli_bad_input_is_a_clear_error(run, args, message):
    workdir, _ = run
    out = _evaluate(*([f"--workdir={workdir}"] if "--workdir" not in args[0] else []), *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_workdir_without_a_run_is_a_clear_error(tmp_path):
    out = _evaluate(f"--workdir={tmp_path}")
    assert out.returncode != 0 and "holds no cnn_lab run" in out.stderr


def test_load_run_readme_snippet(run):
    workdir, _ = run
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("In your own scripts")[1].split("```python")[1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace('"runs/lenet_digits"', repr(str(workdir))), scope)
    assert scope["logits"].shape == (8, 10)
    assert "opt_state" not in scope["variables"]  # only what inference needs was read
    leaves = jax.tree.leaves(scope["variables"])
    assert all(x.devices() == {jax.devices("cpu")[0]} for x in leaves)


def test_plain_orbax_restore_from_the_docs(run):
    workdir, _ = run
    readme = (ROOT / "docs" / "evaluation.md").read_text()
    snippet = readme.split("with Orbax alone")[1].split("```python")[1].split("```")[0]
    step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    scope: dict = {}
    exec(snippet.replace("runs/lenet_digits", str(workdir)).replace("<step>", str(step)), scope)
    _, variables, _ = cnn_lab.load_run(workdir, "latest")
    np.testing.assert_array_equal(
        scope["state"]["params"]["Dense_2"]["kernel"], variables["params"]["Dense_2"]["kernel"]
    )


def test_streaming_evaluation_sees_what_device_evaluation_sees(run, tmp_path, monkeypatch):
    workdir, _ = run
    streamed_splits = []
    stream = streaming.eval_batches
    monkeypatch.setattr(
        streaming, "eval_batches", lambda *a, **k: streamed_splits.append(a[1]) or stream(*a, **k)
    )
    streamed = tmp_path / "streamed"
    shutil.copytree(workdir, streamed)
    config = json.loads((streamed / "config.json").read_text())
    assert config["config"]["data"]["input_mode"] in ("auto", "device")
    config["config"]["data"]["input_mode"] = "streaming"
    (streamed / "config.json").write_text(json.dumps(config))

    _, device_log_probs, device_labels = evaluate_run(workdir, "latest", "test", ("raw",))
    _, stream_log_probs, stream_labels = evaluate_run(streamed, "latest", "test", ("raw",))
    assert streamed_splits == ["test[:256]"]
    assert len(stream_labels) == 256
    np.testing.assert_array_equal(stream_labels, device_labels)
    np.testing.assert_allclose(stream_log_probs, device_log_probs, atol=1e-5)

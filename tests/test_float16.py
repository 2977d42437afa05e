"""float16 compute with dynamic loss scaling: results as float32's, overflow steps skipped and
counted, the loss scale checkpointed (exact resume), older checkpoints still restore."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnn_lab import checkpoint, loss_scaling
from cnn_lab import workdir as workdir_lib
from cnn_lab.averaging import Averaging
from cnn_lab.configs import lenet_digits
from cnn_lab.data import loading
from cnn_lab.metric_writer import MetricWriter, TrainWindow
from cnn_lab.runtime import sharding
from cnn_lab.train import train_and_evaluate

MLP = dict(name="mlp", num_classes=10, hidden_sizes=(32,), dropout_rate=0.0)
RESNET = dict(name="resnet", num_classes=10, family="cifar", depth=8)


def _loss_scale(init: float = 2.0**15, growth_steps: int = 2000):
    knobs = dict(loss_scale_init=init, loss_scale_growth_steps=growth_steps)
    return loss_scaling.from_config("float16", ml_collections.ConfigDict(knobs))


def _train(tiny_steps, model_config, loss_scale=None, steps=3, micro_batches=1):
    """(state, per-step metrics) after `steps` steps of a tiny model on one device."""
    mesh, state, train_step, _ = tiny_steps.setup(
        model_config,
        jax.devices()[:1],
        image_size=8,
        learning_rate=0.1,
        label_smoothing=0.1,
        micro_batches=micro_batches,
        loss_scale=loss_scale,
    )
    history = []
    for i in range(steps):
        batch = sharding.to_global(tiny_steps.batch(8, 16, seed=i), mesh)
        state, metrics = train_step(state, batch)
        history.append(jax.device_get(metrics))
    assert train_step._cache_size() == 1
    return state, history


def _bitwise_equal(a, b) -> bool:
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, a, b))
    return bool(leaves) and all(leaves)


def test_only_float16_gets_a_loss_scale():
    train = ml_collections.ConfigDict(dict(loss_scale_init=2.0**15, loss_scale_growth_steps=10))
    assert loss_scaling.from_config("float32", train) is None
    assert loss_scaling.from_config("bfloat16", train) is None
    scale = loss_scaling.from_config("float16", train)
    assert float(scale.scale) == 2.0**15 and scale.growth_interval == 10


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_float16_training_follows_float32_with_float32_state(tiny_steps, micro_batches):
    state32, history32 = _train(tiny_steps, MLP, micro_batches=micro_batches)
    state16, history16 = _train(
        tiny_steps, {**MLP, "compute_dtype": "float16"}, _loss_scale(), micro_batches=micro_batches
    )
    floats = [
        x
        for x in jax.tree.leaves((state16.params, state16.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert [m["skipped_steps"] for m in history16] == [0.0, 0.0, 0.0]
    assert [m["loss_scale"] for m in history16] == [2.0**15] * 3
    assert "skipped_steps" not in history32[0] and state32.loss_scale is None
    np.testing.assert_allclose(
        [m["loss"] for m in history16], [m["loss"] for m in history32], rtol=3e-3
    )
    chex.assert_trees_all_close(
        jax.device_get(state16.params), jax.device_get(state32.params), atol=3e-3
    )
    assert not _bitwise_equal(state16.params, state32.params)  # float16 really ran


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_an_overflowing_step_is_skipped_counted_and_halves_the_scale(tiny_steps, micro_batches):
    # BatchNorm statistics and an EMA: everything a step updates must stay as it was.
    mesh, state, train_step, _ = tiny_steps.setup(
        {**RESNET, "compute_dtype": "float16"},
        jax.devices()[:1],
        image_size=8,
        learning_rate=0.1,
        label_smoothing=0.0,
        averaging=Averaging(ema_decay=0.9),
        micro_batches=micro_batches,
        loss_scale=_loss_scale(),
    )
    state, metrics = train_step(state, sharding.to_global(tiny_steps.batch(8, 16, 0), mesh))
    assert float(metrics["skipped_steps"]) == 0.0
    # Inject an overflow: a scale of 2^60 turns the float16 backward pass into infinities.
    state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(2.0**60)))
    before = jax.device_get(state)
    after, metrics = train_step(state, sharding.to_global(tiny_steps.batch(8, 16, 1), mesh))
    after = jax.device_get(after)
    assert float(metrics["skipped_steps"]) == 1.0
    assert float(metrics["loss_scale"]) == 2.0**60
    assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
    assert float(after.loss_scale.scale) == 2.0**59
    assert int(after.step) == int(before.step) + 1
    for field in ("params", "batch_stats", "opt_state", "averages"):
        assert _bitwise_equal(getattr(after, field), getattr(before, field)), field
    assert after.averages and after.batch_stats  # The check above compared something.
    assert checkpoint.nonfinite(after) == []  # The checkpoint policy saves it.


def test_the_scale_doubles_after_growth_steps_finite_steps(tiny_steps):
    state, history = _train(
        tiny_steps, {**MLP, "compute_dtype": "float16"}, _loss_scale(2.0**10, 2), steps=4
    )
    assert [m["loss_scale"] for m in history] == [2.0**10, 2.0**10, 2.0**10, 2.0**11]
    assert float(state.loss_scale.scale) == 2.0**11


def _window(tmp_path) -> TrainWindow:
    return TrainWindow(MetricWriter(tmp_path, enabled=False), 16, 10, 0, is_lead=True)


def _step_metrics(loss: float, grad_norm: float, skipped: float) -> dict:
    return dict(loss=loss, accuracy=0.5, grad_norm=grad_norm, skipped_steps=skipped)


def test_the_guard_passes_handled_overflows_and_stops_a_non_finite_state(tmp_path, tiny_steps):
    window = _window(tmp_path)
    for metrics in (_step_metrics(2.0, 1.0, 0.0), _step_metrics(2.0, np.inf, 1.0)):
        window.add({k: np.float32(v) for k, v in metrics.items()})
    written = window.write(2)
    assert written["skipped_steps"] == 1.0 and written["grad_norm"] == 1.0  # Steps taken only.
    # A state that is itself non-finite: its loss is NaN, though the step is skipped too.
    mesh, state, train_step, _ = tiny_steps.setup(
        {**MLP, "compute_dtype": "float16"},
        jax.devices()[:1],
        image_size=8,
        learning_rate=0.1,
        label_smoothing=0.0,
        loss_scale=_loss_scale(),
    )
    state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    _, metrics = train_step(state, sharding.to_global(tiny_steps.batch(8, 16), mesh))
    assert float(metrics["skipped_steps"]) == 1.0
    window = _window(tmp_path)
    window.add(metrics)
    with pytest.raises(FloatingPointError, match=r"Non-finite loss .* at step 1 .*bfloat16"):
        window.write(1)


def test_checkpoints_from_before_the_loss_scale_restore(tmp_path, tiny_steps):
    _, state, _, _ = tiny_steps.setup(
        MLP, jax.devices()[:1], image_size=8, learning_rate=0.1, label_smoothing=0.0
    )
    manager = checkpoint.make_manager(tmp_path / checkpoint.LATEST_DIR, 2)
    older = {k: v for k, v in vars(state).items() if k != "loss_scale"}  # Saved as before.
    checkpoint.save(manager, older, 1)
    manager.wait_until_finished()
    restored = checkpoint.restore_newest_valid(manager, state)
    manager.close()
    assert restored.loss_scale is None
    assert _bitwise_equal(restored.params, state.params)


# --- End to end: LeNet on digits, smoke size. ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    loading.num_classes("digits", data_dir=path)
    return path


def _config(data_dir, compute_dtype):
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.model.compute_dtype = compute_dtype
    config.train.loss_scale_growth_steps = 1  # The scale changes often: resume must restore it.
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 100
    return config


@pytest.fixture(scope="module")
def float16_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("float16")
    return workdir, train_and_evaluate(_config(data_dir, "float16"), workdir)


def _saved_state(workdir, step):
    path = (workdir / checkpoint.LATEST_DIR / str(step) / "default").absolute()
    return ocp.StandardCheckpointer().restore(path)


def test_float16_digits_reaches_float32_accuracy(tmp_path, data_dir, float16_run):
    workdir, results16 = float16_run
    results32 = train_and_evaluate(_config(data_dir, "float32"), tmp_path)
    assert abs(results16["test"]["accuracy"] - results32["test"]["accuracy"]) <= 0.03
    np.testing.assert_allclose(results16["test"]["loss"], results32["test"]["loss"], rtol=0.05)
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert train and all("skipped_steps" in r and "loss_scale" in r for r in train)


def test_float16_resume_is_bitwise_exact(tmp_path, data_dir, float16_run):
    workdir, _ = float16_run
    steps = sorted(int(p.name) for p in (workdir / checkpoint.LATEST_DIR).iterdir())
    last, resume_at = steps[-1], steps[1]
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    for step in steps[2:]:  # As if killed after the second save (mid-run).
        shutil.rmtree(resumed / checkpoint.LATEST_DIR / str(step))
    train_and_evaluate(_config(data_dir, "float16"), resumed)
    expected, found = _saved_state(workdir, last), _saved_state(resumed, last)
    assert int(found["step"]) == last and resume_at < last
    assert float(expected["loss_scale"]["scale"]) != 2.0**15  # It grew: it was restored.
    chex.assert_trees_all_equal(found, expected)


def test_runs_from_before_loss_scaling_resume_with_its_defaults(tmp_path):
    saved = lenet_digits.get_config().to_dict()
    del saved["train"]["loss_scale_init"], saved["train"]["loss_scale_growth_steps"]
    workdir_lib.write_config(tmp_path, ml_collections.ConfigDict(saved), provenance={})
    workdir_lib.check_resumable(tmp_path, lenet_digits.get_config())
    changed = lenet_digits.get_config()
    changed.train.loss_scale_init = 2.0**10
    with pytest.raises(ValueError, match=r"train.loss_scale_init: 32768.0 -> 1024.0"):
        workdir_lib.check_resumable(tmp_path, changed)

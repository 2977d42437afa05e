"""Mixed precision (config.model.compute_dtype) and gradient accumulation over micro-batches."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import lenet_digits
from cnn_lab.models import RNG_STREAMS, get_model
from cnn_lab.runtime import sharding
from cnn_lab.train import train_and_evaluate

# Every model of the registry, small; (model config, image side, channels).
MODELS = {
    "mlp": (dict(name="mlp", hidden_sizes=(16,)), 8, 1),
    "lenet5": (dict(name="lenet5"), 32, 1),
    "convnet": (dict(name="convnet", hidden_size=16), 28, 1),
    "alexnet": (dict(name="alexnet", variant="cifar", local_response_norm=True), 32, 3),
    "vgg": (dict(name="vgg", depth=11, batch_norm=True, hidden_sizes=(16,)), 32, 3),
    "resnet": (dict(name="resnet", family="cifar", depth=8, stochastic_depth_rate=0.2), 16, 3),
    "odenet": (dict(name="odenet", width=8, steps=2, max_steps=4), 28, 1),
    "ode_resnet": (dict(name="ode_resnet", depth=8, width=0.5, ode_stages=(1,)), 16, 3),
}


def _matmul_dtypes(jaxpr) -> set[str]:
    """Operand dtypes of the layers' convolutions and matrix products, loop bodies included.

    Products with a 1-D operand are an ODE solver's own arithmetic on its float32 state
    (Runge-Kutta weights times stages, error norms), not layers.
    """
    found = set()
    for eqn in jaxpr.eqns:
        layer = all(v.aval.ndim > 1 for v in eqn.invars)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated") and layer:
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found |= _matmul_dtypes(sub)
    return found


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
def test_models_compute_in_the_compute_dtype_and_keep_float32_variables(name, compute_dtype):
    model_config, size, channels = MODELS[name]
    config = ml_collections.ConfigDict(
        dict(model_config, num_classes=10, compute_dtype=compute_dtype)
    )
    model = get_model(config)
    images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    assert {str(x.dtype) for x in jax.tree.leaves(variables)} == {"float32"}

    def forward(variables, images):
        rngs = dict.fromkeys(RNG_STREAMS, jax.random.PRNGKey(0))
        return model.apply(variables, images, train=True, rngs=rngs, mutable=True)

    jaxpr = jax.make_jaxpr(forward)(variables, images)
    assert _matmul_dtypes(jaxpr.jaxpr) == {compute_dtype}
    (logits, updated) = jax.eval_shape(forward, variables, images)
    assert logits.dtype == jnp.dtype(compute_dtype)
    assert {str(x.dtype) for x in jax.tree.leaves(updated.get("batch_stats", {}))} <= {"float32"}


def test_unknown_compute_dtype_is_a_clear_error():
    config = ml_collections.ConfigDict(dict(name="mlp", num_classes=10, compute_dtype="float64"))
    with pytest.raises(ValueError, match=r"compute_dtype='float64'.*bfloat16"):
        get_model(config)


MLP = dict(name="mlp", num_classes=10, hidden_sizes=(32,), dropout_rate=0.0)


def _train(
    tiny_steps,
    model_config: dict,
    batch_size: int,
    micro_batches: int = 1,
    steps: int = 3,
    devices: int = 8,
):
    """(params, batch_stats, opt_state, losses) after `steps` steps of a tiny model."""
    mesh, state, train_step, _ = tiny_steps.setup(
        model_config,
        jax.devices()[:devices],
        image_size=8,
        learning_rate=0.1,
        label_smoothing=0.1,
        micro_batches=micro_batches,
    )
    losses = []
    for i in range(steps):
        batch = sharding.to_global(tiny_steps.batch(8, batch_size, seed=i), mesh)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert train_step._cache_size() == 1
    return jax.device_get((state.params, state.batch_stats, state.opt_state)), losses


def test_bfloat16_training_keeps_float32_state_and_follows_float32(tiny_steps):
    (params32, _, _), losses32 = _train(tiny_steps, MLP, 16, devices=1)
    (params16, _, opt16), losses16 = _train(
        tiny_steps, {**MLP, "compute_dtype": "bfloat16"}, 16, devices=1
    )
    floats = [
        x for x in jax.tree.leaves((params16, opt16)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert np.all(np.isfinite(losses16))
    np.testing.assert_allclose(losses16, losses32, rtol=1e-2)
    chex.assert_trees_all_close(params16, params32, atol=1e-2)
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), params16, params32)
    assert any(jax.tree.leaves(differs))  # bfloat16 really ran: not bit-identical


def test_micro_batches_equal_one_large_batch(tiny_steps):
    (big, _, _), big_losses = _train(tiny_steps, MLP, 32)
    (micro, _, _), micro_losses = _train(tiny_steps, MLP, 32, micro_batches=4)
    chex.assert_trees_all_close(micro, big, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(micro_losses, big_losses, rtol=1e-5)


def test_batchnorm_statistics_update_once_per_micro_batch(tiny_steps):
    resnet = dict(name="resnet", num_classes=10, family="cifar", depth=8)
    # One device: BatchNorm's cross-device reductions are not what is tested here.
    mesh, state, train_step, _ = tiny_steps.setup(
        resnet,
        jax.devices()[:1],
        image_size=8,
        learning_rate=0.1,
        label_smoothing=0.0,
        micro_batches=2,
    )
    batch = tiny_steps.batch(8, 32)
    model = get_model(ml_collections.ConfigDict(resnet))
    expected = state.batch_stats
    for rows in (slice(0, None, 2), slice(1, None, 2)):  # Micro-batch i: rows i, i + k, ...
        variables = {"params": state.params, "batch_stats": expected}
        _, updates = model.apply(variables, batch["image"][rows], train=True, mutable=True)
        expected = jax.device_get(updates["batch_stats"])
    state, _ = train_step(state, sharding.to_global(batch, mesh))
    chex.assert_trees_all_close(jax.device_get(state.batch_stats), expected, atol=1e-5)


def test_grad_accumulation_that_does_not_divide_the_batch_is_a_clear_error(tmp_path):
    config = lenet_digits.get_config("smoke")
    config.train.grad_accumulation_steps = 3
    with pytest.raises(ValueError, match=r"grad_accumulation_steps=3 .*divide .*batch_size=128"):
        train_and_evaluate(config, tmp_path)


def test_runs_from_before_these_knobs_resume_only_with_their_defaults(tmp_path):
    saved = lenet_digits.get_config().to_dict()
    del saved["model"]["compute_dtype"], saved["train"]["grad_accumulation_steps"]
    workdir_lib.write_config(tmp_path, ml_collections.ConfigDict(saved), provenance={})
    workdir_lib.check_resumable(tmp_path, lenet_digits.get_config())
    changed = lenet_digits.get_config()
    changed.model.compute_dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"model.compute_dtype: 'float32' -> 'bfloat16'"):
        workdir_lib.check_resumable(tmp_path, changed)

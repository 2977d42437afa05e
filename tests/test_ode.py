"""ODE blocks: solver accuracy against expm, gradients, NFE metrics, and the sharded train step."""

import functools
import importlib
import subprocess
import sys
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from cnn_lab import evaluation, models, steps
from cnn_lab.configs import common
from cnn_lab.models import METRIC_WARNINGS, get_model, metric_warnings
from cnn_lab.models.ode import Conv3x3, ODEBlock, ODEFunc, ODENet, ODEResNet
from cnn_lab.models.ode_config import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS, SolverConfig
from cnn_lab.models.ode_solve import SOLVERS, solve
from cnn_lab.models.resnet import ResNet
from cnn_lab.runtime import sharding

ALL_SOLVERS = (*FIXED_STEP_SOLVERS, *ADAPTIVE_SOLVERS)


def test_every_solver_name_has_a_class_and_diffrax_loads_only_for_ode_models():
    assert set(SOLVERS) == set(ALL_SOLVERS)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, cnn_lab.train; print('diffrax' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert loaded.strip() == "False"


def linear_field(t, y, a):
    del t
    return a @ y


def _linear_problem(dtype=np.float32):
    rng = np.random.default_rng(0)
    a = (0.5 * rng.standard_normal((4, 4))).astype(dtype)
    y0 = rng.standard_normal(4).astype(dtype)
    return a, y0


def _block_and_params(config: SolverConfig, shape=(2, 4, 4, 4), seed=0):
    block = ODEBlock(config)
    x = jax.random.normal(jax.random.PRNGKey(seed), shape)
    params = block.init(jax.random.PRNGKey(seed + 1), x, train=False)["params"]
    return block, params, x


def _sown(block, params, x) -> dict[str, float]:
    _, state = block.apply({"params": params}, x, train=True, mutable=["metrics"])
    return {k: float(v) for k, v in steps.sown_metrics(state["metrics"]).items()}


# --- the solve --------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_zero_vector_field_is_the_identity(solver: str):
    y0 = jnp.arange(6.0).reshape(2, 3)
    y1, stats = solve(lambda t, y, args: jnp.zeros_like(y), y0, None, SolverConfig(solver))
    np.testing.assert_array_equal(y1, y0)
    assert float(stats["max_steps_reached"]) == 0.0


def test_block_with_zero_output_norm_is_the_identity():
    block, params, x = _block_and_params(SolverConfig("dopri5"))
    norm3 = params["func"]["norm3"]
    params["func"]["norm3"] = {k: jnp.zeros_like(v) for k, v in norm3.items()}  # f == 0
    np.testing.assert_array_equal(block.apply({"params": params}, x, train=False), x)


# (solver, steps or tolerance, allowed error): each well inside its order's error at that step.
EXPM_CASES = [
    ("euler", 2000, 2e-3),
    ("midpoint", 100, 1e-3),
    ("heun", 100, 1e-3),
    ("ralston", 100, 1e-3),
    ("rk4", 20, 1e-4),
    ("bosh3", 1e-6, 1e-4),
    ("dopri5", 1e-6, 1e-4),
    ("tsit5", 1e-6, 1e-4),
]


@pytest.mark.parametrize(("solver", "setting", "error"), EXPM_CASES)
def test_linear_dynamics_match_the_matrix_exponential(solver: str, setting, error: float):
    a, y0 = _linear_problem()
    if solver in FIXED_STEP_SOLVERS:
        config = SolverConfig(solver, steps=setting, t1=1.5)
    else:
        config = SolverConfig(solver, rtol=setting, atol=setting, max_steps=1000, t1=1.5)
    y1, stats = jax.jit(lambda y0, a: solve(linear_field, y0, a, config))(y0, a)
    expected = scipy.linalg.expm(a.astype(np.float64) * 1.5) @ y0
    np.testing.assert_allclose(y1, expected, rtol=error, atol=error)
    assert float(stats["max_steps_reached"]) == 0.0


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(solver: str, order: int):
    # Halving the step divides the global error by 2**order; RK4 is our own Butcher tableau.
    with jax.enable_x64(True):
        a, y0 = _linear_problem(np.float64)
        expected = scipy.linalg.expm(a) @ y0
        errors = [
            np.abs(solve(linear_field, y0, a, SolverConfig(solver, steps=n))[0] - expected).max()
            for n in (16, 32)
        ]
    assert 2**order * 0.8 < errors[0] / errors[1] < 2**order * 1.25


def test_one_euler_step_is_a_residual_block():
    block, params, x = _block_and_params(SolverConfig("euler", steps=1, t1=1.0))
    f = ODEFunc(x.shape[-1])
    expected = x + f.apply({"params": params["func"]}, x, jnp.zeros(()))
    out = block.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_im2col_and_native_convolution_agree():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 3))
    variables = Conv3x3(4).init(jax.random.PRNGKey(1), x)
    native = Conv3x3(4, im2col=False).apply(variables, x)
    np.testing.assert_allclose(Conv3x3(4).apply(variables, x), native, rtol=1e-5, atol=1e-5)
    # The same parameters as nn.Conv: checkpoints move between the two implementations.
    conv = nn.Conv(4, (3, 3), padding=1)
    np.testing.assert_allclose(conv.apply(variables, x), native, rtol=1e-5, atol=1e-5)


# --- gradients --------------------------------------------------------------------------------


def _loss(block, params, x):
    return jnp.sum(jnp.sin(block.apply({"params": params}, x, train=True)))


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        block, params, x = _block_and_params(SolverConfig("rk4", steps=3))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        x = x.astype(jnp.float64)
        grad_p, grad_x = jax.grad(functools.partial(_loss, block), argnums=(0, 1))(params, x)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(7), len(leaves) + 1)
        v_p = treedef.unflatten(
            [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=False)]
        )
        v_x = jax.random.normal(keys[-1], x.shape, x.dtype)
        eps = 1e-6

        def shifted(sign):
            p = jax.tree.map(lambda p, v: p + sign * eps * v, params, v_p)
            return _loss(block, p, x + sign * eps * v_x)

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, v)
            for g, v in zip(jax.tree.leaves(grad_p), jax.tree.leaves(v_p), strict=True)
        ) + jnp.vdot(grad_x, v_x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def _flat_grads(config: SolverConfig) -> jax.Array:
    """d loss / d (params, x) of a small block, as one float64 vector."""
    block, params, x = _block_and_params(config)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    grads = jax.jit(jax.grad(functools.partial(_loss, block), argnums=(0, 1)))(
        params, x.astype(jnp.float64)
    )
    return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])


def _relative_error(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize(
    ("config", "tolerance"),
    [
        # Fixed steps: the adjoint ODE is solved on the same grid, so both are the gradient
        # of (nearly) the same discretisation.
        (dict(solver="rk4", steps=64), 1e-5),
        # Adaptive: each is within its tolerance of the true gradient. Loose because f has
        # ReLUs, so it is not smooth and error estimates are rough (RK4's error here falls
        # like steps**-1.2, not steps**-4).
        (dict(solver="dopri5", rtol=1e-7, atol=1e-7, max_steps=1024), 2e-2),
    ],
)
def test_adjoint_and_backprop_gradients_agree(config: dict, tolerance: float):
    with jax.enable_x64(True):
        backprop = _flat_grads(SolverConfig(**config, adjoint="backprop"))
        adjoint = _flat_grads(SolverConfig(**config, adjoint="adjoint"))
        assert _relative_error(adjoint, backprop) < tolerance


def test_adjoint_backward_solve_reaching_max_steps_raises():
    # The forward solve fits in 60 steps, the backward one does not: with throw=False the
    # gradients would silently be those of a truncated backward solve.
    config = SolverConfig("dopri5", rtol=1e-7, atol=1e-7, max_steps=60, adjoint="adjoint")
    with jax.enable_x64(True), pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(_flat_grads(config))


# --- NFE and step statistics ------------------------------------------------------------------


def test_adaptive_nfe_grows_when_rtol_is_tightened():
    nfe = []
    for rtol in (1e-2, 1e-4, 1e-6):
        block, params, x = _block_and_params(SolverConfig("dopri5", rtol=rtol, atol=1e-6))
        sown = _sown(block, params, x)
        assert sown["ode_max_steps_reached"] == 0.0
        assert sown["ode_steps"] == sown["ode_accepted_steps"] + sown["ode_rejected_steps"]
        nfe.append(sown["ode_nfe"])
    assert nfe[0] < nfe[1] < nfe[2]


@pytest.mark.parametrize(
    ("solver", "steps"), [("euler", 5), ("heun", 5), ("rk4", 3), ("bosh3", 64), ("dopri5", 64)]
)
def test_nfe_counts_every_vector_field_call(solver: str, steps: int):
    # A small first step (t1 / 64) is accepted, where the count is exact (see `solve`).
    calls = []

    def field(t, y, a):
        jax.debug.callback(lambda: calls.append(1))
        return linear_field(t, y, a)

    a, y0 = _linear_problem()
    config = SolverConfig(solver, steps=steps, rtol=1e-5, atol=1e-5, max_steps=256)
    _, stats = jax.jit(lambda y0, a: solve(field, y0, a, config))(y0, a)
    jax.effects_barrier()
    assert float(stats["nfe"]) == len(calls) > 0


def test_reaching_max_steps_is_reported_not_raised():
    block, params, x = _block_and_params(SolverConfig("dopri5", rtol=1e-9, atol=1e-9, max_steps=2))
    out, state = block.apply({"params": params}, x, train=True, mutable=["metrics"])
    sown = steps.sown_metrics(state["metrics"])
    assert float(sown["ode_max_steps_reached"]) == 1.0
    assert float(sown["ode_steps"]) == 2.0
    assert np.isfinite(np.asarray(out)).all()  # the state reached, short of t1
    assert metric_warnings(sown) == [METRIC_WARNINGS["ode_max_steps_reached"]]
    assert "config.model.max_steps" in metric_warnings(sown)[0]
    assert metric_warnings({**sown, "ode_max_steps_reached": 0.0}) == []


def test_sown_metrics_average_blocks_and_keep_every_name():
    sown = {
        "stage1_ode": {"ode_nfe": (jnp.float32(14.0),), "other": (jnp.float32(2.0),)},
        "stage2_ode": {"ode_nfe": (jnp.float32(20.0),)},
    }
    assert {k: float(v) for k, v in steps.sown_metrics(sown).items()} == {
        "ode_nfe": 17.0,
        "other": 2.0,
    }
    assert steps.sown_metrics({}) == {}
    with pytest.raises(ValueError, match=r"sowed 'other' of shape \(3,\).*scalars only"):
        steps.sown_metrics({"block": {"other": (jnp.ones(3),)}})


class SowsAProbe(nn.Module):
    """A model that is no ODE and sows "probe" twice (3 and 5): a metric of any model."""

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        self.sow("metrics", "probe", jnp.float32(3.0))
        self.sow("metrics", "probe", jnp.float32(5.0))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


def test_any_sown_metric_reaches_train_and_eval_metrics(monkeypatch, make_steps, make_batch):
    monkeypatch.setitem(models.MODELS, "sows_a_probe", SowsAProbe)
    mesh, state, train_step, eval_step = make_steps(
        dict(name="sows_a_probe", num_classes=10), jax.devices()
    )
    state, metrics = train_step(state, sharding.to_global(make_batch(), mesh))  # donates state
    assert float(metrics["probe"]) == 4.0  # the mean of the two
    batch = make_batch(16)
    batch["mask"] = np.arange(16) < 11
    sums = eval_step(state.variables, sharding.to_global(batch, mesh))
    assert float(sums["probe"]) == 4.0 * 11  # weighted by real rows
    result = evaluation.evaluate(eval_step, state.variables, [batch], mesh)
    assert result["probe"] == 4.0 and result["count"] == 11


# --- models -----------------------------------------------------------------------------------


def _param_shapes(model: nn.Module, image_size: int, channels: int) -> dict:
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return jax.tree.map(lambda leaf: leaf.shape, variables)


def test_odenet_has_the_papers_size():
    params = _param_shapes(ODENet(10), 28, 1)["params"]
    # Chen et al. (2018), Table 1: 0.22M parameters.
    assert (
        sum(
            int(np.prod(s)) for s in jax.tree.leaves(params, is_leaf=lambda s: isinstance(s, tuple))
        )
        == 208_266
    )
    assert params["ode"]["func"]["conv1"]["kernel"] == (3, 3, 65, 64)  # time is one more channel


def test_ode_resnet_without_ode_stages_is_the_cifar_resnet():
    ode = _param_shapes(ODEResNet(10, depth=20, ode_stages=()), 32, 3)
    assert ode == _param_shapes(ResNet(10, depth=20, family="cifar"), 32, 3)
    staged = _param_shapes(ODEResNet(10, depth=20, ode_stages=(2,)), 32, 3)["params"]
    assert "stage2_block1" in staged and "stage2_ode" in staged  # the downsampling block stays
    assert "stage2_block2" not in staged and "stage1_block3" in staged
    assert staged["stage2_ode"]["func"]["conv1"]["kernel"] == (3, 3, 33, 32)


def test_registry_builds_both_models_and_rejects_bad_settings():
    config = ml_collections.ConfigDict(dict(name="ode_resnet", num_classes=10, ode_stages=[1, 3]))
    model = get_model(config)
    assert isinstance(model, ODEResNet) and model.ode_stages == (1, 3)
    assert isinstance(
        get_model(ml_collections.ConfigDict(dict(name="odenet", num_classes=10))), ODENet
    )
    with pytest.raises(ValueError, match=r"Unknown ODE solver 'rk45'.*config.model.solver"):
        SolverConfig("rk45")
    with pytest.raises(ValueError, match=r"ode_stages=\(4,\)"):
        _param_shapes(ODEResNet(10, ode_stages=(4,)), 32, 3)


@pytest.mark.parametrize(
    ("name", "params"),
    [("odenet_digits", 208_266), ("odenet_mnist", 208_266), ("ode_resnet_cifar10", 251_866)],
)
def test_configs_build_their_model(name: str, params: int):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert common.apply_mode(config, "smoke").train.num_epochs == 2
    model = get_model(config.model)
    size, channels = config.data.image_size, config.data.channels
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)

    def init_and_apply(x):
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        return variables["params"], model.apply(variables, x, train=False)

    shapes, logits = jax.eval_shape(init_and_apply, x)
    assert logits.shape == (2, config.model.num_classes)
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == params


# --- the sharded train step -------------------------------------------------------------------

TINY_ODENET = dict(name="odenet", num_classes=10, width=8, solver="dopri5", max_steps=16)


@pytest.fixture
def make_steps(tiny_steps):
    """make_steps(model_config, devices): tiny_steps.setup over 12x12 images."""
    return functools.partial(
        tiny_steps.setup, image_size=12, learning_rate=0.01, label_smoothing=0.0
    )


@pytest.fixture
def make_batch(tiny_steps):
    """make_batch(n=16, seed=0): random 12x12 images and labels."""
    return functools.partial(tiny_steps.batch, 12)


def test_odenet_sharded_train_step_matches_one_device_and_reports_nfe(make_steps, make_batch):
    # Fixed steps, so 1 and 8 devices take the same steps: equal up to float reassociation.
    assert jax.device_count() == 8
    config = {**TINY_ODENET, "solver": "rk4", "steps": 2}
    runs = {}
    for n in (1, 8):
        mesh, state, train_step, eval_step = make_steps(config, jax.devices()[:n])
        for i in range(3):
            state, metrics = train_step(state, sharding.to_global(make_batch(seed=i), mesh))
        assert train_step._cache_size() == 1  # no recompilation after the first step
        runs[n] = (jax.device_get(state.params), jax.device_get(metrics))
    chex.assert_trees_all_close(runs[1][0], runs[8][0], atol=1e-4, rtol=1e-4)
    metrics = runs[8][1]
    np.testing.assert_allclose(metrics["loss"], runs[1][1]["loss"], rtol=1e-5)
    assert metrics["ode_nfe"] == 8.0  # 2 steps of 4 stages
    assert metrics["ode_steps"] == metrics["ode_accepted_steps"] == 2.0
    assert metrics["ode_rejected_steps"] == metrics["ode_max_steps_reached"] == 0.0

    batch = make_batch(16)
    batch["mask"] = np.arange(16) < 11
    sums = eval_step(state.variables, sharding.to_global(batch, mesh))
    assert float(sums["ode_nfe"]) == 8.0 * float(sums["count"]) == 88.0  # weighted by real rows


def test_adaptive_adjoint_odenet_trains_in_the_sharded_step(make_steps, make_batch):
    first = {}
    for n in (1, 8):
        config = {**TINY_ODENET, "adjoint": "adjoint"}
        mesh, state, train_step, _ = make_steps(config, jax.devices()[:n])
        before = jax.device_get(state.params)
        state, metrics = train_step(state, sharding.to_global(make_batch(), mesh))
        first[n] = jax.device_get(metrics)
    assert np.isfinite(first[8]["loss"]) and np.isfinite(first[8]["grad_norm"])
    # One step agrees; later ones may not: a float difference can flip an accept/reject.
    np.testing.assert_allclose(first[8]["loss"], first[1]["loss"], rtol=1e-5)
    assert first[8]["ode_nfe"] == first[1]["ode_nfe"] == 1 + 6 * first[8]["ode_steps"]  # FSAL
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(moved))


def test_models_that_sow_nothing_keep_their_metrics(make_steps, make_batch):
    mesh, state, train_step, _ = make_steps(
        dict(name="mlp", num_classes=10, hidden_sizes=(16,)), jax.devices()
    )
    _, metrics = train_step(state, sharding.to_global(make_batch(), mesh))
    assert set(metrics) == {"loss", "accuracy", "learning_rate", "grad_norm"}

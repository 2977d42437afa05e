"""cnn_lab's CPU convolutions (oneDNN, batch-minor) equal XLA's, forward and both gradients,
wherever the zoo convolves."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from cnn_lab.kernels import build, selection, stand_ins
from cnn_lab.models import conv_implementation, get_model, layers
from cnn_lab.runtime import sharding

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The oneDNN wheels are Linux x86-64 only and the wrapper needs g++.
pytestmark = pytest.mark.skipif(
    build.problem() is not None, reason=f"no CPU kernels here: {build.problem()}"
)
CONV_MODELS = ("lenet5", "convnet", "alexnet", "vgg", "resnet", "odenet", "ode_resnet")


@pytest.fixture(autouse=True)
def _look_at_the_process_again():
    # Selection looks at the backend and devices once per process; tests patch them.
    selection._process_obstacles.cache_clear()
    yield
    selection._process_obstacles.cache_clear()


def _config_names() -> list[str]:
    # own_data's model is the ConvNet's, and its input shape and classes come from the data.
    skip = ("__init__", "common", "own_data")
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in skip)


def _zoo_convolutions() -> dict[tuple, set[str]]:
    """Every distinct convolution the configs' models make -> the configs that make it.

    A key is (input H, W, C; kernel shape; strides; padding; dilation; groups), recorded by a
    stand-in convolution while each model is traced at its config's image size.
    """
    found: dict[tuple, set[str]] = {}
    for name in _config_names():
        config = importlib.import_module(f"configs.{name}").get_config()
        if config.model.name not in CONV_MODELS:
            continue

        def record(lhs, rhs, strides, padding, config_name=name, **kw):  # flax passes keywords
            pads = padding if isinstance(padding, str) else tuple(map(tuple, padding))
            dilation = tuple(kw.get("rhs_dilation") or (1, 1))
            key = (lhs.shape[1:], rhs.shape, tuple(strides), pads, dilation)
            found.setdefault((*key, kw.get("feature_group_count", 1)), set()).add(config_name)
            return lax.conv_general_dilated(lhs, rhs, strides, padding, **kw)

        model = get_model(config.model).clone(convolution=record)
        size, channels = config.data.image_size, config.data.channels
        x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
        jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x, train=False), x)
    return found


ZOO = _zoo_convolutions()
# Beyond the zoo: dilation, uneven padding, "SAME" with a stride that does not divide.
EXTRA = [
    ((9, 9, 3), (3, 3, 3, 4), (1, 1), ((2, 2), (2, 2)), (2, 2), 1),
    ((9, 10, 5), (3, 2, 5, 7), (2, 1), ((1, 2), (0, 1)), (1, 1), 1),
    ((11, 11, 4), (3, 3, 4, 8), (2, 2), "SAME", (1, 1), 1),
]


def test_every_conv_model_convolves_through_its_field():
    # A model that called lax directly would record nothing and run XLA's convolution.
    makers = set().union(*ZOO.values())
    for name in _config_names():
        config = importlib.import_module(f"configs.{name}").get_config()
        if config.model.name in CONV_MODELS:
            assert name in makers, name
    assert {"resnet50_imagenet", "vgg16_cifar10", "alexnet_cifar10", "lenet_cifar10"} <= makers


def _small(geometry: tuple) -> tuple:
    """The geometry with spatial sizes cut to 8 or 9 (same parity), to keep the test quick;
    the edge handling (padding, strides that do not divide) is the same."""
    (h, w, c), kernel, *rest = geometry
    return ((min(h, 8 + h % 2), min(w, 8 + w % 2), c), kernel, *rest)


GEOMETRIES = sorted({_small(g) for g in ZOO}, key=str) + EXTRA


def _few_channels(geometry: tuple) -> tuple:
    """The geometry with at most 17 input and 19 output channels: batch-minor tests run 80
    images, and the kernels' channel tiles (6 or 8) still end in partial tiles."""
    (h, w, c), (kh, kw, _, o), *rest = geometry
    return ((h, w, min(c, 17)), (kh, kw, min(c, 17), min(o, 19)), *rest)


# Padding the zoo does not make, for the batch-minor kernels' implicit padding: uneven, whole
# output rows and columns in the padding (1x1 kernel), and more than the kernel's size - 1
# (a negative padding for the input gradient).
PADDED = [
    ((9, 9, 4), (3, 3, 4, 7), (1, 1), ((1, 2), (3, 0)), (1, 1), 1),
    ((8, 8, 3), (1, 1, 3, 5), (1, 1), ((2, 2), (1, 1)), (1, 1), 1),
]
# The batch-minor kernels take stride 1 without dilation (others go to oneDNN); 80 images make
# a block of 64 lanes and one of 16, 48 images one block of 3 vectors.
BATCH_MINOR_GEOMETRIES = sorted(
    {_few_channels(g) for g in GEOMETRIES if g[2] == (1, 1) and g[4] == (1, 1)}, key=str
)
CASES = (
    [("onednn", 2, g) for g in GEOMETRIES]
    + [("batch_minor", 80, g) for g in BATCH_MINOR_GEOMETRIES + PADDED]
    + [("batch_minor", 48, g) for g in PADDED]
)


@pytest.mark.parametrize("implementation, batch, geometry", CASES, ids=str)
def test_cpu_convolution_matches_xla_forward_and_gradients(implementation, batch, geometry):
    (h, w, c), kernel, strides, padding, dilation, groups = geometry
    assert groups == 1  # A grouped conv would need the XLA fallback tested here instead.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=kernel), jnp.float32)

    def run(fn):
        def conv_fn(x, k):
            return fn(
                x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=stand_ins.NHWC
            )

        y, vjp = jax.vjp(conv_fn, x, k)
        dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
        return (y, *vjp(dy))

    function = selection.convolution(implementation)
    both = jax.jit(lambda x, k: (run(lax.conv_general_dilated), run(function)))
    assert f"cnn_lab_{implementation}_conv_forward" in both.lower(x, k).as_text()
    expected, actual = both(x, k)
    for want, got, what in zip(
        expected, actual, ("output", "input grad", "kernel grad"), strict=True
    ):
        assert got.shape == want.shape
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def test_batch_minor_passes_strides_dilation_and_odd_batches_to_onednn():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    for batch, strides, dilation in (
        (16, (2, 2), (1, 1)),
        (16, (1, 1), (2, 2)),
        (20, (1, 1), (1, 1)),
    ):
        x = jnp.asarray(rng.normal(size=(batch, 9, 9, 4)), jnp.float32)

        def fn(x, k, strides=strides, dilation=dilation):
            return stand_ins.batch_minor_conv_general_dilated(
                x, k, strides, "SAME", rhs_dilation=dilation, dimension_numbers=stand_ins.NHWC
            )

        hlo = jax.jit(fn).lower(x, k).as_text()
        assert "cnn_lab_onednn_conv_forward" in hlo and "batch_minor" not in hlo
        expected = lax.conv_general_dilated(
            x, k, strides, "SAME", rhs_dilation=dilation, dimension_numbers=stand_ins.NHWC
        )
        np.testing.assert_allclose(fn(x, k), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["onednn", "batch_minor"])
def test_an_empty_output_is_xlas(implementation):
    x, k = jnp.ones((16, 4, 4, 3)), jnp.ones((5, 5, 3, 6))
    function = jax.jit(
        lambda x, k: selection.convolution(implementation)(
            x, k, (1, 1), "VALID", dimension_numbers=stand_ins.NHWC
        )
    )
    assert "cnn_lab" not in function.lower(x, k).as_text()
    assert function(x, k).shape == (16, 0, 0, 6)


@pytest.mark.slow
def test_the_kernels_compile_for_cpus_without_avx512(tmp_path):
    # -march=native builds them for this machine; an AVX2-only machine must build them too.
    command = build.compile_command(tmp_path / "avx2.so", march="x86-64-v3")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_calls_onednn_does_not_take_fall_back_to_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)
    grouped = dict(feature_group_count=2, dimension_numbers=stand_ins.NHWC)
    np.testing.assert_array_equal(
        stand_ins.onednn_conv_general_dilated(x, k, (1, 1), "SAME", **grouped),
        lax.conv_general_dilated(x, k, (1, 1), "SAME", **grouped),
    )
    hlo = jax.jit(
        lambda x, k: stand_ins.onednn_conv_general_dilated(x, k, (1, 1), "SAME", **grouped)
    )
    assert "cnn_lab_onednn" not in hlo.lower(x, k).as_text()
    cropping = dict(padding=((-1, 1), (0, 0)), dimension_numbers=stand_ins.NHWC)  # XLA crops
    k4 = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    np.testing.assert_array_equal(
        stand_ins.onednn_conv_general_dilated(x, k4, (1, 1), **cropping),
        lax.conv_general_dilated(x, k4, (1, 1), **cropping),
    )
    nchw = jax.jit(lambda x, k: stand_ins.onednn_conv_general_dilated(x, k, (1, 1), "SAME"))
    x_nchw, k_oihw = jnp.transpose(x, (0, 3, 1, 2)), jnp.zeros((6, 4, 3, 3))
    assert "cnn_lab_onednn" not in nchw.lower(x_nchw, k_oihw).as_text()  # lax's default layout
    k = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    nhwc = jax.jit(
        lambda x, k: stand_ins.onednn_conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=stand_ins.NHWC
        )
    )
    assert "cnn_lab_onednn_conv_forward" in nhwc.lower(x, k).as_text()


@pytest.mark.parametrize("implementation, batch", [("onednn", 2), ("batch_minor", 16)])
def test_vmap_over_kernels_matches_xla(implementation, batch):
    # Ensembles and per-example tricks vmap models; the FFI call runs once per member.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 8, 8, 3)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 5)), jnp.float32)

    def apply(fn):
        return jax.vmap(lambda k: fn(x, k, (1, 1), "SAME", dimension_numbers=stand_ins.NHWC))(
            kernels
        )

    np.testing.assert_allclose(
        apply(selection.convolution(implementation)),
        apply(lax.conv_general_dilated),
        rtol=1e-5,
        atol=1e-4,
    )


RESNET = dict(name="resnet", num_classes=10, depth=8, family="cifar")


@pytest.mark.parametrize(
    "model, implementation, image_size",
    [(RESNET, "onednn", 8), (dict(name="lenet5", num_classes=10), "batch_minor", 28)],
    ids=["resnet-onednn", "lenet5-batch_minor"],
)
def test_a_train_step_with_cpu_convolutions_matches_xla(
    monkeypatch, tiny_steps, model, implementation, image_size
):
    # BatchNorm, residuals, strided convs, pooling, biases and the optimizer around the calls.
    runs = {}
    for name in ("xla", implementation):
        monkeypatch.setattr(selection, "resolve", lambda *_, i=name: i)
        mesh, state, train_step, _ = tiny_steps.setup(
            model, jax.devices()[:1], image_size=image_size, learning_rate=0.1, label_smoothing=0.0
        )
        for i in range(2):
            batch = sharding.to_global(tiny_steps.batch(image_size, 16, seed=i), mesh)
            state, metrics = train_step(state, batch)
        runs[name] = jax.device_get((state.params, metrics["loss"]))
    chex.assert_trees_all_close(runs["xla"], runs[implementation], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("implementation", ["onednn", "batch_minor"])
def test_get_model_hands_the_resolved_convolution_to_every_conv_model(monkeypatch, implementation):
    monkeypatch.setattr(selection, "resolve", lambda *_: implementation)
    for name in CONV_MODELS:
        model = get_model(ml_collections.ConfigDict(dict(name=name, num_classes=3)))
        assert model.convolution is selection.convolution(implementation), name
        assert conv_implementation(model) == implementation


def test_auto_picks_batch_minor_only_for_models_of_few_channels(monkeypatch):
    # As on a one-device CPU run: resolve's other checks pass.
    def resolve(implementation, compute_dtype="float32", few_channels=False):
        return "batch_minor" if few_channels else "onednn"

    monkeypatch.setattr(selection, "resolve", resolve)
    for name in CONV_MODELS:
        model = get_model(ml_collections.ConfigDict(dict(name=name, num_classes=3)))
        expected = "batch_minor" if name == "lenet5" else "onednn"
        assert conv_implementation(model) == expected, name


def test_a_model_without_convolutions_never_resolves_one(monkeypatch):
    def refuse(*_):
        raise AssertionError("resolve called for a model without convolutions")

    monkeypatch.setattr(selection, "resolve", refuse)
    mlp = get_model(ml_collections.ConfigDict(dict(name="mlp", num_classes=3)))
    assert conv_implementation(mlp) == "xla"
    with pytest.raises(ValueError, match="'cudnn' is not one of"):
        get_model(
            ml_collections.ConfigDict(dict(name="mlp", num_classes=3, conv_implementation="cudnn"))
        )


def test_resolve_picks_the_kernels_on_many_devices_and_explains_a_bad_choice(monkeypatch):
    assert jax.device_count() == 8  # The kernels split the batch over the devices.
    monkeypatch.setattr(build, "wide_vectors", lambda: True)
    assert selection.resolve("auto") == "onednn"
    assert selection.resolve("xla") == "xla"
    assert selection.resolve("batch_minor") == "batch_minor"
    for implementation in ("onednn", "batch_minor"):
        with pytest.raises(ValueError, match=r"bfloat16, not float32.*conv_implementation=auto"):
            selection.resolve(implementation, "bfloat16")
    with pytest.raises(ValueError, match="'cudnn' is not one of auto, xla, onednn"):
        selection.resolve("cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    selection._process_obstacles.cache_clear()
    assert selection.resolve("auto") == "xla"
    with pytest.raises(ValueError, match=r"the backend is gpu, not cpu"):
        selection.resolve("onednn")


def test_auto_picks_batch_minor_for_few_channels_with_avx512(monkeypatch):
    monkeypatch.setattr(build, "wide_vectors", lambda: True)
    assert selection.resolve("auto", few_channels=True) == "batch_minor"
    assert selection.resolve("auto", few_channels=False) == "onednn"
    assert selection.resolve("auto", "bfloat16", few_channels=True) == "xla"
    monkeypatch.setattr(build, "wide_vectors", lambda: False)
    assert selection.resolve("auto", few_channels=True) == "onednn"
    with pytest.raises(ValueError, match=r"no AVX-512.*conv_implementation=auto"):
        selection.resolve("batch_minor")


@pytest.mark.slow
def test_a_default_training_run_uses_batch_minor_on_one_device(tmp_path):
    # Outside the test session's 8 forced devices, as a user's run: cpu_devices 0 -> 1 device.
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
    command = [
        sys.executable, "-m", "cnn_lab.train", "--config=configs/lenet_digits.py:smoke",
        f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]  # fmt: skip
    root = CONFIG_DIR.parent
    subprocess.run(command, cwd=root, env={**os.environ, "XLA_FLAGS": flags}, check=True)
    provenance = json.loads((tmp_path / "config.json").read_text())["provenance"]
    # The default config trains LeNet-5, whose convolutions have few channels.
    assert (provenance["device_count"], provenance["conv_implementation"]) == (1, "batch_minor")


@pytest.mark.parametrize("padding", ["VALID", "SAME", 2, ((1, 2), (0, 1))], ids=str)
def test_layers_conv_is_nn_conv_with_the_bias_inside_the_call(padding):
    # Same parameter names, shapes and initial values (checkpoints and transfer patterns hold),
    # same result under every implementation.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 9, 9, 3)), jnp.float32)
    reference = nn.Conv(6, (5, 5), (1, 1), padding=padding)
    params = reference.init(jax.random.PRNGKey(1), x)
    for implementation in ("xla", "onednn", "batch_minor"):
        ours = layers.Conv(6, (5, 5), 1, padding, convolution=selection.convolution(implementation))
        chex.assert_trees_all_equal(ours.init(jax.random.PRNGKey(1), x), params)
        shifted = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # A non-zero bias.
        np.testing.assert_allclose(
            ours.apply(shifted, x), reference.apply(shifted, x), rtol=1e-5, atol=1e-5
        )


def test_batch_minor_sums_the_bias_gradient_in_its_kernel_pass():
    # XLA would re-lay the batch-minor output gradient out to reduce it: no reduce may remain.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 12, 12, 3)), jnp.float32)
    dy = jnp.asarray(np.random.default_rng(1).normal(size=(32, 8, 8, 6)), jnp.float32)

    def gradients(implementation):
        module = layers.Conv(6, (5, 5), padding="VALID")
        module = module.clone(convolution=selection.convolution(implementation))
        params = module.init(jax.random.PRNGKey(0), x)

        def vjp(params):
            return jax.vjp(lambda p: module.apply(p, x), params)[1](dy)[0]

        return jax.jit(vjp), params

    fused, params = gradients("batch_minor")
    hlo = fused.lower(params).as_text()
    assert "cnn_lab_batch_minor_conv_kernel_backward" in hlo and "reduce" not in hlo
    xla, _ = gradients("xla")
    assert "reduce" in xla.lower(params).as_text()  # The check above can see a reduce.
    chex.assert_trees_all_close(fused(params), xla(params), rtol=1e-4, atol=1e-4)

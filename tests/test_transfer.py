"""Transfer learning: loading with a new head, frozen parameters, phases, groups, class subsets."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnn_lab import checkpoint, optim, param_groups, saved_run, steps, transfer
from cnn_lab.configs import transfer_digits, transfer_digits_pretrain
from cnn_lab.data import loading, pipeline
from cnn_lab.models import get_model
from cnn_lab.state import create_train_state
from cnn_lab.train import train_and_evaluate

LENET = dict(name="lenet5", num_classes=10)
BACKBONE = ("Conv_.*", "Dense_0", "Dense_1")


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        param_groups.path_name(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


def _optimizer_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        name="adam",
        learning_rate=0.01,
        momentum=0.9,
        nesterov=False,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=5e-4,
        grad_clip_norm=1.0,
    )
    return ml_collections.ConfigDict({**values, **overrides})


def _lenet_state(tx):
    model = get_model(ml_collections.ConfigDict(LENET))
    schedule_config = dict(decay_factor=0.1, plateau_patience=2, plateau_min_delta=1e-3)
    plateau = optim.make_plateau(ml_collections.ConfigDict(schedule_config))
    return model, create_train_state(model, tx, plateau, jax.random.PRNGKey(0), (32, 32, 1))


def _batch(seed=0, n=8, size=32, channels=1, classes=10):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, size, size, channels)).astype(np.float32),
        "label": rng.integers(0, classes, n).astype(np.int32),
    }


def test_frozen_params_do_not_move_and_have_no_optimizer_state():
    tx = optim.make_optimizer(_optimizer_config(), optax.constant_schedule(0.01), frozen=BACKBONE)
    model, state = _lenet_state(tx)
    step = jax.jit(
        lambda s, b: steps.train_step(
            s, b, model=model, tx=tx, schedule=optax.constant_schedule(0.01), label_smoothing=0.0
        )
    )
    before = _leaves(state.params)
    for i in range(3):
        state, _ = step(state, _batch(i))
    after = _leaves(state.params)
    for name in before:
        if param_groups.matches(BACKBONE, name):
            assert np.array_equal(before[name], after[name]), name  # bitwise
        else:
            assert not np.array_equal(before[name], after[name]), name
    # Adam's moments exist for the head alone; the backbone's entries are empty (MaskedNode).
    moment_paths = [n for n, x in _leaves(state.opt_state).items() if x.ndim > 0]
    assert moment_paths and all("/Dense_2/" in n for n in moment_paths), moment_paths
    head_size = sum(x.size for n, x in before.items() if n.startswith("Dense_2"))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * head_size  # Adam's mu and nu of the head only


def test_param_groups_scale_the_learning_rate():
    oc = _optimizer_config(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=None)
    plain = optim.make_optimizer(oc, optax.constant_schedule(0.1))
    grouped = optim.make_optimizer(oc, optax.constant_schedule(0.1), groups=(("Conv_.*", 0.1),))
    _, state = _lenet_state(plain)
    grads = jax.tree.map(jnp.ones_like, state.params)
    a = _leaves(plain.update(grads, plain.init(state.params), state.params)[0])
    b = _leaves(grouped.update(grads, grouped.init(state.params), state.params)[0])
    for name in a:
        ratio = 0.1 if name.startswith("Conv_") else 1.0
        np.testing.assert_allclose(b[name], ratio * a[name], rtol=1e-6)


def test_a_pattern_matching_nothing_is_an_error_naming_it():
    tx = optim.make_optimizer(_optimizer_config(), optax.constant_schedule(0.1), frozen=("conv0",))
    with pytest.raises(ValueError, match=r"\['conv0'\] match no parameter.*Conv_0/kernel"):
        _lenet_state(tx)


def test_frozen_batch_norm_keeps_its_statistics():
    model = get_model(
        ml_collections.ConfigDict(
            dict(name="resnet", family="cifar", depth=8, width=0.25, num_classes=10)
        )
    )
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    frozen = ("stem_.*", "stage1_.*")
    batch = _batch(size=8)

    def stats_after(frozen_norms):
        @jax.jit
        def train_mode_pass(variables, images):
            with nn.intercept_methods(steps.frozen_norm_interceptor(frozen_norms)):
                return model.apply(variables, images, train=True, mutable=["batch_stats"])[1]

        return _leaves(train_mode_pass(variables, batch["image"])["batch_stats"])

    before = _leaves(variables["batch_stats"])
    kept, trained = stats_after(frozen), stats_after(())
    for name, value in before.items():
        if param_groups.matches(frozen, name):
            assert np.array_equal(kept[name], value), name
            assert not np.array_equal(trained[name], value), name
        else:
            assert not np.array_equal(kept[name], value), name


def test_transplant_replaces_the_head_and_names_misfits():
    def variables(fill, classes):
        return {
            "params": {
                "Conv_0": {"kernel": fill((5, 5, 1, 6))},
                "Dense_2": {"kernel": fill((84, classes))},
            }
        }

    fresh, saved = variables(np.zeros, 3), variables(np.ones, 7)
    loaded = transfer.transplant(fresh, saved, load=(".*",), head=("Dense_2",))
    assert np.all(loaded["params"]["Conv_0"]["kernel"] == 1)
    assert loaded["params"]["Dense_2"]["kernel"].shape == (84, 3)
    assert np.all(loaded["params"]["Dense_2"]["kernel"] == 0)
    misfit = r"params/Dense_2/kernel: .* \(84, 7\), this model \(84, 3\).*init_from.head"
    with pytest.raises(ValueError, match=misfit):
        transfer.transplant(fresh, saved, load=(".*",), head=())


def test_class_subsets_are_renumbered_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    keep, renumbered = pipeline.select_classes(labels, (7, 2))
    assert set(labels[keep]) == {2, 7}
    np.testing.assert_array_equal(renumbered, np.where(labels[keep] == 7, 0, 1))
    chosen = pipeline.examples_per_class(renumbered, 4, seed=0)
    assert np.bincount(renumbered[chosen]).tolist() == [4, 4]
    np.testing.assert_array_equal(chosen, pipeline.examples_per_class(renumbered, 4, seed=0))
    assert not np.array_equal(chosen, pipeline.examples_per_class(renumbered, 4, seed=1))
    with pytest.raises(ValueError, match="train_examples_per_class=31"):
        pipeline.examples_per_class(renumbered, 31, seed=0)


def test_phases_must_add_up_to_the_run():
    config = transfer_digits.get_config()
    phases_epochs = sum(p["epochs"] for p in config.phases)
    config.train.num_epochs = phases_epochs + 10
    with pytest.raises(ValueError, match=rf"{phases_epochs} epochs in all.*num_epochs="):
        optim.make_phases(config, steps_per_epoch=5, total_steps=5 * config.train.num_epochs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    loading.num_classes("digits", data_dir=path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A short run on digits 0-6 (7 classes), the source of the transfers below."""
    config = transfer_digits_pretrain.get_config("smoke")
    config.data.data_dir = data_dir
    config.data.classes = tuple(range(7))
    config.model.num_classes = 7
    config.train.num_epochs = 1
    workdir = tmp_path_factory.mktemp("pretrained")
    train_and_evaluate(config, workdir)
    return workdir


def _transfer_config(data_dir, pretrained):
    """Digits 7-9 from 10 labels each: phase 1 (the head) one epoch, phase 2 (all) one."""
    config = transfer_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.data.classes = (7, 8, 9)
    config.data.train_examples_per_class = 10
    config.model.num_classes = 3
    config.train.batch_size = 8  # 3 steps per epoch
    config.init_from.workdir = str(pretrained)
    config.init_from.checkpoint = "latest"
    return config


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, data_dir, pretrained):
    workdir = tmp_path_factory.mktemp("fine_tuned")
    train_and_evaluate(_transfer_config(data_dir, pretrained), workdir)
    return workdir


def _params(workdir, step):
    return _leaves(saved_run.load_run(workdir, step)[1]["params"])


def test_phases_switch_which_params_move(pretrained, fine_tuned):
    source = _leaves(transfer.read_variables(pretrained, "latest")["params"])
    boundary, end = _params(fine_tuned, 3), _params(fine_tuned, 6)
    assert boundary["Dense_2/kernel"].shape == (84, 3) != source["Dense_2/kernel"].shape
    for name in source:
        if name.startswith("Dense_2"):
            continue
        # Loaded, frozen through phase 1 (bitwise), trained in phase 2.
        assert np.array_equal(boundary[name], source[name]), name
        assert not np.array_equal(end[name], boundary[name]), name


def test_resume_right_at_the_phase_boundary_is_exact(tmp_path, data_dir, pretrained, fine_tuned):
    resumed = tmp_path / "resumed"
    shutil.copytree(fine_tuned, resumed)
    for directory in (checkpoint.LATEST_DIR, checkpoint.BEST_DIR):
        for step in (resumed / directory).iterdir():
            if step.name.isdigit() and int(step.name) > 3:
                shutil.rmtree(step)
    train_and_evaluate(_transfer_config(data_dir, pretrained), resumed)
    final, expected = _params(resumed, 6), _params(fine_tuned, 6)
    assert all(np.array_equal(final[n], expected[n]) for n in expected)


def test_loading_a_misfit_without_declaring_the_head_fails_before_training(
    tmp_path, data_dir, pretrained
):
    config = _transfer_config(data_dir, pretrained)
    config.init_from.head = ()
    with pytest.raises(ValueError, match=r"params/Dense_2/bias: .* \(7,\), this model \(3,\)"):
        train_and_evaluate(config, tmp_path)
    assert not (tmp_path / checkpoint.LATEST_DIR).exists() or not any(
        (tmp_path / checkpoint.LATEST_DIR).iterdir()
    )

"""Model registry: the config's `model.name` picks a flax.linen module; other fields are its arguments."""

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from cnn_lab.models.alexnet import AlexNet
from cnn_lab.models.convnet import ConvNet
from cnn_lab.models.layers import check_removal
from cnn_lab.models.lenet import LeNet5
from cnn_lab.models.mlp import MLP
from cnn_lab.models.ode import METRIC_WARNINGS as ODE_METRIC_WARNINGS
from cnn_lab.models.ode import ODENet, ODEResNet
from cnn_lab.models.resnet import ResNet
from cnn_lab.models.vgg import VGG

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "convnet": ConvNet,
    "alexnet": AlexNet,
    "vgg": VGG,
    "resnet": ResNet,
    "odenet": ODENet,
    "ode_resnet": ODEResNet,
}

# Metrics the models sow (see steps.sown_metrics) that must stay 0, with what to change if not.
METRIC_WARNINGS: dict[str, str] = {**ODE_METRIC_WARNINGS}

# Every random stream a model may draw from; the train step supplies a key for each.
RNG_STREAMS = ("dropout", "stochastic_depth")

# config.model.compute_dtype -> the models' `dtype`. float16 trains with dynamic loss scaling
# (cnn_lab.loss_scaling), for GPUs without bfloat16.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The module named by `model_config.name`, built with the remaining fields as arguments.

    `compute_dtype` ("float32", "bfloat16" or "float16") becomes the module's `dtype`: activations are
    computed in it, parameters are created and kept in float32. `conv_implementation`
    ("auto", "xla", "onednn" or "batch_minor", see `cnn_lab.kernels`) picks the convolution
    the module runs. `remove` names layers to leave out, for the models that have
    `removable_layers()`; an unknown name raises here, before any run starts.
    """
    kwargs = dict(model_config)
    name = kwargs.pop("name")
    # Optional in a model config written by hand; the zoo's configs set all three.
    compute_dtype = kwargs.pop("compute_dtype", "float32")
    conv_implementation = kwargs.pop("conv_implementation", "auto")
    remove = tuple(kwargs.pop("remove", ()))
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.model.compute_dtype={compute_dtype!r} is not one of "
            f"{', '.join(COMPUTE_DTYPES)}. Set --config.model.compute_dtype=bfloat16 for mixed "
            "precision (float16 on GPUs without bfloat16), or float32."
        )
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r} (config.model.name). Known models: {', '.join(sorted(MODELS))}."
        )
    cls = MODELS[name]
    set_here = {"parent", "name", "dtype", "convolution"}
    fields = {f.name for f in dataclasses.fields(cls)} - set_here
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"config.model has field(s) {unknown} that model {name!r} does not take. "
            f"Its fields are: {', '.join(sorted(fields))}."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "remove" in fields:
        kwargs["remove"] = remove
    elif remove:
        removing = sorted(n for n, c in MODELS.items() if hasattr(c, "removable_layers"))
        raise ValueError(
            f"config.model.remove={remove!r}, but model {name!r} has no removable layers. "
            f"Layer removal is for {', '.join(removing)}; set --config.model.remove='()'."
        )
    convolution = _convolution(conv_implementation, compute_dtype, cls)
    if _has_convolutions(cls):
        kwargs["convolution"] = convolution
    model = cls(**kwargs, dtype=COMPUTE_DTYPES[compute_dtype])
    if remove:  # Checked here too (not only when traced): a bad name fails config validation.
        check_removal(remove, model.removable_layers(), name)
    return model


def conv_implementation(model: nn.Module) -> str:
    """The convolution ("xla", "onednn" or "batch_minor") a model built by get_model runs."""
    return getattr(getattr(model, "convolution", None), "implementation", "xla")


def has_convolutions(name: str) -> bool:
    """Whether the model called `name` takes a convolution (an unknown name: False)."""
    return name in MODELS and _has_convolutions(MODELS[name])


def metric_warnings(metrics: Mapping[str, float]) -> list[str]:
    """The warning of each metric in `metrics` that must stay 0 (METRIC_WARNINGS) and is not."""
    return [warning for name, warning in METRIC_WARNINGS.items() if metrics.get(name, 0.0) > 0]


def _has_convolutions(cls: type[nn.Module]) -> bool:
    return "convolution" in {f.name for f in dataclasses.fields(cls)}


def _convolution(implementation: str, compute_dtype: str, cls: type[nn.Module]) -> Callable:
    """The convolution `cls` runs for config.model.conv_implementation=`implementation`.

    The one seam to cnn_lab's CPU kernels, chosen after the backend is known: XLA's
    convolution ("xla", or "auto" off CPU or for a model without convolutions) needs nothing
    of `cnn_lab.kernels`, which is imported only here and only for a CPU backend or an
    explicit CPU choice.
    """
    convolves = _has_convolutions(cls)
    if implementation == "xla" or (
        implementation == "auto" and not (convolves and jax.default_backend() == "cpu")
    ):
        return lax.conv_general_dilated
    from cnn_lab.kernels import selection

    if not convolves:  # Only the name is checked.
        selection.check_name(implementation)
        return lax.conv_general_dilated
    few_channels = getattr(cls, "few_channel_convolutions", False)
    return selection.select(implementation, compute_dtype, few_channels)

"""ODE-Net (Chen et al., 2018) on the embedded digits data (8x8 images), resized to 16x16.

    python -m cnn_lab.train --config=configs/odenet_digits.py --workdir=runs/odenet_digits

Expected: test accuracy 0.9933 (seed 0) in about 4 minutes on 2 CPU cores shared with other
jobs, no accelerator (measured before augmentation moved onto the devices); 208,266
parameters, dopri5 at tolerance 1e-3 taking 3 steps (19 function evaluations) at every
training step, ~160 train images/s. The ResNet of matching width (the paper's baseline: 6
residual blocks of the same f, without time, instead of the ODE block; 578,314 parameters),
2.5 minutes, 0.9889, ~310 images/s:

    python -m cnn_lab.train --config=configs/odenet_digits.py --workdir=runs/resnet6_digits \\
        --config.model.residual_blocks=6 --config.model.im2col=False

`--config=configs/odenet_digits.py:smoke` trains for a few steps (tests, debugging).
Train metrics include the ODE solve's `ode_nfe`, `ode_steps`, `ode_accepted_steps`,
`ode_rejected_steps` and `ode_max_steps_reached` (metrics.jsonl, TensorBoard).
"""

from ml_collections import config_dict

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    # 16x16 gives a 3x3x64 ODE state; 28x28 (MNIST's 6x6x64) makes each step slower (docs/cpu_kernels.md).
    config = common.get_base_config("digits", image_size=16)
    config.model.name = "odenet"
    config.model.width = 64  # Channels of the downsampling convs and of the ODE state.
    config.model.solver = "dopri5"  # euler|midpoint|heun|ralston|rk4 (fixed); bosh3|dopri5|tsit5.
    config.model.steps = 4  # Fixed: steps over [0, t1]; adaptive: first step t1 / steps.
    config.model.rtol = 1e-3  # Adaptive: relative tolerance (the paper: 1e-3).
    config.model.atol = 1e-3  # Adaptive: absolute tolerance.
    config.model.max_steps = 32  # Adaptive: bound on attempted steps (then stops short of t1).
    config.model.adjoint = "backprop"  # backprop (through the solver) | adjoint (backsolve).
    config.model.checkpoints = config_dict.placeholder(int)  # backprop: None: log2(max_steps).
    config.model.t1 = 1.0  # Integrate over [0, t1].
    config.model.activation = "relu"
    config.model.im2col = True  # Vector-field convs as matmuls: faster on CPU (docs).
    config.model.residual_blocks = 0  # > 0: that many residual blocks instead (a ResNet).

    config.augment.crop_padding = 2  # Shifts of up to 2 of 16 pixels.
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.schedule.warmup_epochs = 1.0
    config.train.label_smoothing = 0.1
    config.train.num_epochs = 30
    config.train.log_every_steps = 10
    return common.apply_mode(config, mode)

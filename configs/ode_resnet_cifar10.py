"""ResNet-20 on CIFAR-10 with its second stage an ODE block (an "ODE-ResNet").

    python -m cnn_lab.train --config=configs/ode_resnet_cifar10.py --workdir=runs/ode_resnet_cifar10

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

configs/resnet20_cifar10.py's network and recipe (He et al., 2016: SGD 0.1, momentum 0.9,
batch 128, weight decay 1e-4, 45k/5k split, pad-4 crops, flips), with stage 2's two
shape-preserving residual blocks replaced by one ODE block of width 32 over [0, 1] (dopri5,
tolerance 1e-3; its downsampling first block stays): 0.25M parameters against ResNet-20's
0.27M. Any subset of stages: `--config.model.ode_stages="(1, 2, 3)"`; `()` is exactly
ResNet-20. A cosine schedule over 100 epochs (1-epoch warm-up, Nesterov momentum) instead of
the paper's steps at 32k/48k of 64k iterations, to keep the NFE-heavy run shorter.

Expected: not measured here (no CIFAR-10 on the development machine); He et al. report 8.75%
test error for ResNet-20. Cost on 2 busy CPU cores, measured before cnn_lab's CPU
convolutions: ~5.5 s per 128-image step at init (19 evaluations) against 1.3 s for ResNet-20,
so ~30 min an epoch. On a GPU use `--config.model.im2col=False`.
"""

from ml_collections import config_dict

from cnn_lab.configs import common

_TRAIN_EXAMPLES = 45_000  # He et al.'s split: 45k train, 5k validation.


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.data.train_split = f"train[:{_TRAIN_EXAMPLES}]"
    config.data.validation_split = f"train[{_TRAIN_EXAMPLES}:]"
    config.augment.crop_padding = 4  # Pad 4 and crop 32x32 at random.
    config.augment.flip = True  # Mirrored objects keep their class.
    config.model.name = "ode_resnet"
    config.model.depth = 20  # 6n+2: blocks per stage n = 3.
    config.model.width = 1.0  # Multiplies the 16/32/64 channels.
    config.model.ode_stages = (2,)  # 1-based stages whose residual blocks are an ODE block.
    config.model.solver = "dopri5"  # euler|midpoint|heun|ralston|rk4 (fixed); bosh3|dopri5|tsit5.
    config.model.steps = 4  # Fixed: steps over [0, t1]; adaptive: first step t1 / steps.
    config.model.rtol = 1e-3  # Adaptive: relative tolerance.
    config.model.atol = 1e-3  # Adaptive: absolute tolerance.
    config.model.max_steps = 32  # Adaptive: bound on attempted steps (then stops short of t1).
    config.model.adjoint = "backprop"  # backprop (through the solver) | adjoint (backsolve).
    config.model.checkpoints = config_dict.placeholder(int)  # backprop: None: log2(max_steps).
    config.model.t1 = 1.0  # Integrate over [0, t1].
    config.model.im2col = True  # Vector-field convs as matmuls (fast on CPU); False on GPU/TPU.
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 1.0
    config.train.batch_size = 128
    config.train.num_epochs = 100
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

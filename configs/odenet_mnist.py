"""ODE-Net (Chen et al., 2018, "Neural ordinary differential equations") on MNIST.

    python -m cnn_lab.train --config=configs/odenet_mnist.py --workdir=runs/odenet_mnist

Needs MNIST prepared in TFDS format (`tfds build mnist` on a machine with internet).

The paper's network: downsampling convs to 6x6x64, one ODE block over [0, 1] solved by an
adaptive Runge-Kutta method at tolerance 1e-3, GroupNorm, 0.22M parameters (here 208,266),
trained with SGD for 160 epochs; its NFE grows during training (its Figure 3: ~25 forward
evaluations at the end). Here the recipe of configs/odenet_digits.py (0.9933 there) with a
schedule for 54k training images. The ResNet of matching width:
`--config.model.residual_blocks=6 --config.model.im2col=False`.

Expected: not measured here (no MNIST on the development machine). Chen et al. (Table 1)
report 0.42% test error (ResNet of 6 blocks: 0.41%). At 28x28 a 128-image step took ~1.8 s
on 2 busy CPU cores (~13 min an epoch, ~2 hours in all); on a GPU use
`--config.model.im2col=False`.
"""

from cnn_lab.configs import common, odenet_digits


def get_config(mode: str | None = None):
    config = common.get_base_config("mnist", image_size=28)
    config.model = odenet_digits.get_config().model  # The same ODE-Net and solver settings.
    config.model.num_classes = 10
    config.augment.crop_padding = 2  # Shifts of up to 2 of 28 pixels.
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.schedule.warmup_epochs = 0.5
    config.train.label_smoothing = 0.1
    config.train.num_epochs = 10
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

"""The small AlexNet of Zhang et al. (2017) on CIFAR-10 at 32x32.

    python -m cnn_lab.train --config=configs/alexnet_cifar10.py --workdir=runs/alexnet_cifar10

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

Recipe (Zhang et al., 2017, "Understanding deep learning requires rethinking generalization",
appendix A): two (conv 64 5x5, max pool 3x3/2, local response norm) modules, fc 384, fc 192,
no dropout; SGD with momentum 0.9, learning rate 0.01 multiplied by 0.95 after every epoch,
batch 128; weight decay and random crops are the regularisers the paper switches on and off.

Differences: the paper centre-crops to 28x28 (random 28x28 crops as augmentation); here the
full 32x32 image with 4-pixel pad-and-crop. The weight-decay value is not given in the paper;
5e-4 on every kernel is used.

Expected: not measured here (no CIFAR-10 on the development machine). The paper's Table 1
gives ~0.81 test accuracy with weight decay and random crops (~0.76 with neither). About 33M
multiply-adds per image forward.
"""

from cnn_lab.configs import common

_EPOCHS = 100


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.augment.crop_padding = 4  # Pad 4 and crop 32x32 at random.
    config.augment.flip = True  # Mirrored objects keep their class.
    config.model.name = "alexnet"
    config.model.variant = "cifar"  # Zhang et al.'s two-conv AlexNet (TF's CIFAR tutorial).
    config.model.local_response_norm = True  # As in Zhang et al. (and the tutorial).
    config.model.dropout_rate = 0.0  # Zhang et al. use none.
    config.optimizer.name = "sgd"  # SGD with momentum, as in the paper.
    config.optimizer.learning_rate = 0.01  # The paper's initial rate for the small AlexNet.
    config.optimizer.momentum = 0.9  # The paper's momentum.
    config.optimizer.nesterov = False  # Plain momentum.
    config.optimizer.weight_decay = 5e-4  # Not given by the paper; on kernels only.
    config.schedule.name = "piecewise"  # Constant rate, multiplied by decay_factor at steps.
    config.schedule.decay_epochs = tuple(range(1, _EPOCHS))  # Decay after every epoch ...
    config.schedule.decay_factor = 0.95  # ... by 0.95, the paper's exponential decay.
    config.train.batch_size = 128  # As TensorFlow's CIFAR-10 tutorial the net comes from.
    config.train.num_epochs = _EPOCHS  # Rate ends at 0.01 * 0.95^99 ~ 6e-5.
    config.train.log_every_steps = 100  # Train metrics about 3.5 times per epoch.
    return common.apply_mode(config, mode)

"""The small (CIFAR) AlexNet of Zhang et al. (2017) on the embedded digits data at 32x32.

    python -m cnn_lab.train --config=configs/alexnet_digits.py --workdir=runs/alexnet_digits

The two-conv AlexNet (1.75M parameters at 32x32 grey, most in the first dense layer) on the
1,212 training digits upsampled to 32x32, with dropout, random shifts and label smoothing
against over-fitting; Nesterov SGD with a cosine decay rather than Zhang et al.'s
exponential one.

Expected: test accuracy 1.0000 (450/450; validation 0.956, 135 images) for seed 0, in 5
minutes on 2 CPU cores shared with other jobs, no accelerator. `:smoke` trains for a few steps.
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("digits", image_size=32)
    config.augment.crop_padding = 4  # Shifts of up to one 8x8 source pixel.
    config.model.name = "alexnet"
    config.model.variant = "cifar"  # Two (conv 64 5x5, max pool 3x3/2), fc 384, fc 192.
    config.model.dropout_rate = 0.5  # After both hidden dense layers: 1.2k training images.
    config.optimizer.learning_rate = 0.02  # Nesterov SGD 0.9 (the common default).
    config.schedule.warmup_epochs = 1.0  # Linear warm-up over 18 steps, then cosine decay.
    config.train.batch_size = 64  # 18 steps per epoch on the 1,212 training images.
    config.train.num_epochs = 30  # 540 steps.
    config.train.label_smoothing = 0.1  # Against over-confident fits of a tiny data set.
    return common.apply_mode(config, mode)

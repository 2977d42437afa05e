"""LeNet-5 on the embedded digits data (the default run).

    python -m cnn_lab.train --config=configs/lenet_digits.py --workdir=runs/lenet_digits

Expected: test accuracy 1.0000 / 0.9933 / 0.9889 for --config.seed=0 / 1 / 2, in 35-40 s
(start-up included) on 2 CPU cores shared with other jobs, no accelerator.
`--config=configs/lenet_digits.py:smoke` trains for a few steps (tests, debugging).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("digits", image_size=32)
    config.model.name = "lenet5"
    config.model.activation = "relu"  # The 1998 net: tanh.
    config.model.pooling = "max"  # The 1998 net: avg.
    config.augment.crop_padding = 3  # Shifts of up to 3 of 32 pixels.
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.05
    config.schedule.warmup_epochs = 1.0
    config.train.label_smoothing = 0.1
    config.train.num_epochs = 40
    return common.apply_mode(config, mode)

"""LeNet-5 on CIFAR-10 (32x32 RGB).

    python -m cnn_lab.train --config=configs/lenet_cifar10.py --workdir=runs/lenet_cifar10

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

Expected: not measured here (no CIFAR-10 on the development machine). `cnn_lab.benchmark`
measures its train step at 29,001-32,027 images/s on 2 CPU cores (docs/cpu_kernels.md).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.model.name = "lenet5"
    config.model.activation = "relu"  # The 1998 net: tanh.
    config.model.pooling = "max"  # The 1998 net: avg.
    config.optimizer.learning_rate = 0.05
    config.schedule.warmup_epochs = 1.0
    config.train.num_epochs = 30
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

"""LeNet-5 on MNIST, resized to the 32x32 input of the 1998 paper.

    python -m cnn_lab.train --config=configs/lenet_mnist.py --workdir=runs/lenet_mnist

Needs MNIST prepared in TFDS format (`tfds build mnist` on a machine with internet).

Expected: not measured here (no MNIST on the development machine). LeCun et al. (1998,
"Gradient-based learning applied to document recognition") report 0.95% test error for their
LeNet-5 (tanh, average pooling; this config uses relu and max pooling).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("mnist", image_size=32)
    config.model.name = "lenet5"
    config.model.activation = "relu"  # The 1998 net: tanh.
    config.model.pooling = "max"  # The 1998 net: avg.
    config.optimizer.learning_rate = 0.05
    config.schedule.warmup_epochs = 0.5
    config.train.num_epochs = 10
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

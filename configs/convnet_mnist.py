"""The classic 2-conv ConvNet on MNIST (TensorFlow's "Deep MNIST" net).

    python -m cnn_lab.train --config=configs/convnet_mnist.py --workdir=runs/convnet_mnist

Needs MNIST prepared in TFDS format (`tfds build mnist` on a machine with internet).

Expected: not measured here (no MNIST on the development machine). `cnn_lab.benchmark`
measures its train step at 2,062 images/s on 2 CPU cores (docs/cpu_kernels.md).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("mnist", image_size=28)
    config.model.name = "convnet"
    config.model.hidden_size = 1024  # Units of the fully connected layer.
    config.model.dropout_rate = 0.5  # Before the classifier.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.schedule.warmup_epochs = 0.5
    config.train.num_epochs = 10
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

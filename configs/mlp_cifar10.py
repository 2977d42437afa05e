"""The 3072-400-100-700-10 fully connected net on CIFAR-10.

    python -m cnn_lab.train --config=configs/mlp_cifar10.py --workdir=runs/mlp_cifar10

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

Expected: not measured here (no CIFAR-10 on the development machine).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.model.name = "mlp"
    config.model.hidden_sizes = (400, 100, 700)  # Widths of the hidden layers.
    config.model.activation = "relu"  # relu | tanh | sigmoid | gelu | silu | elu.
    config.model.dropout_rate = 0.0  # After each hidden layer.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.train.num_epochs = 30
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)

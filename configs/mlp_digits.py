"""A fully connected net on the embedded digits data at its native 8x8.

    python -m cnn_lab.train --config=configs/mlp_digits.py --workdir=runs/mlp_digits

Expected: not measured yet (configs/lenet_digits.py, measured, reaches 0.99-1.00 on this data).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("digits", image_size=8)
    config.model.name = "mlp"
    config.model.hidden_sizes = (256, 128)  # Widths of the hidden layers.
    config.model.activation = "relu"  # relu | tanh | sigmoid | gelu | silu | elu.
    config.model.dropout_rate = 0.2  # After each hidden layer.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.train.num_epochs = 40
    return common.apply_mode(config, mode)

"""The classic 2-conv ConvNet on the embedded digits data, resized to 28x28.

    python -m cnn_lab.train --config=configs/convnet_digits.py --workdir=runs/convnet_digits

Expected: not measured yet (configs/lenet_digits.py, measured, reaches 0.99-1.00 on this data).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("digits", image_size=28)
    config.model.name = "convnet"
    config.model.hidden_size = 1024  # Units of the fully connected layer.
    config.model.dropout_rate = 0.5  # Before the classifier.
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.schedule.warmup_epochs = 1.0
    config.train.num_epochs = 30
    return common.apply_mode(config, mode)

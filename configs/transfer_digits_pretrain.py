"""Pre-training for the transfer demo: LeNet-5 on digits 0-4 only (all their labels).

    python -m cnn_lab.train --config=configs/transfer_digits_pretrain.py \\
        --workdir=runs/transfer_digits_pretrain

Then `configs/transfer_digits.py` moves its features to digits 5-9 with 3 labels per class.

Expected: test accuracy 1.0000 in under a minute on 2 CPU cores shared with other jobs, no
accelerator.
"""

from cnn_lab.configs import common, lenet_digits


def get_config(mode: str | None = None):
    config = lenet_digits.get_config()
    config.data.classes = (0, 1, 2, 3, 4)
    config.model.num_classes = 5
    config.train.batch_size = 32
    config.train.num_epochs = 20
    return common.apply_mode(config, mode)

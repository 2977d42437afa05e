"""LeNet-5 on Fashion-MNIST, resized to the 32x32 input of the 1998 paper.

    python -m cnn_lab.train --config=configs/lenet_fashion_mnist.py --workdir=runs/lenet_fmnist
    python -m launch.sweep --config=configs/lenet_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/lenet --seeds=3

Offline: `apt-get install dataset-fashion-mnist` provides the original IDX files, which
cnn_lab prepares into TFDS format on first use (or set config.data.source_dir).

Expected: test accuracy 0.9111 +- 0.0019 over seeds 0-2 (0.9129, 0.9112, 0.9092), 1.1-1.4
minutes a run on 2 CPU cores shared with other jobs (the sweep command above). Published: 0.876
for a Keras net of 2 conv layers with max pooling, the nearest to LeNet-5 in Zalando's
benchmark table.
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("fashion_mnist", image_size=32)
    config.model.name = "lenet5"
    config.model.activation = "relu"  # The 1998 net: tanh.
    config.model.pooling = "max"  # The 1998 net: avg.
    config.optimizer.learning_rate = 0.05
    config.schedule.warmup_epochs = 0.5
    config.train.num_epochs = 15
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)


def get_report() -> dict:
    """The published figure beside this config's rows in `python -m cnn_lab.report`."""
    return {"published": "0.876 2 conv layers with max pooling, Keras (Zalando benchmark table)"}

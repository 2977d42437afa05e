"""The classic 2-conv ConvNet on Fashion-MNIST (28x28 grey, 60k train / 10k test).

    python -m cnn_lab.train --config=configs/convnet_fashion_mnist.py --workdir=runs/convnet_fmnist
    python -m launch.sweep --config=configs/convnet_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/convnet --seeds=3

Offline: `apt-get install dataset-fashion-mnist` provides the original IDX files, which
cnn_lab prepares into TFDS format on first use (or set config.data.source_dir).

Expected: test accuracy 0.9269 +- 0.0014 over seeds 0-2 (0.9253, 0.9281, 0.9273; the sweep
command above), 10.5, 6.8 and 6.2 minutes a run on 2 CPU cores, at times shared with other
jobs. Published: 0.916 for this ConvNet from TensorFlow's tutorial after more than 300 epochs
(Zalando's benchmark table).
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("fashion_mnist", image_size=28)
    config.model.name = "convnet"
    config.model.hidden_size = 1024  # Units of the fully connected layer.
    config.model.dropout_rate = 0.5  # Before the classifier.
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.warmup_epochs = 0.5
    config.train.num_epochs = 15
    config.train.log_every_steps = 100
    return common.apply_mode(config, mode)


def get_report() -> dict:
    """The published figure beside this config's rows in `python -m cnn_lab.report`."""
    return {
        "published": "0.916 this ConvNet, TensorFlow tutorial, >300 epochs (Zalando benchmark table)"
    }

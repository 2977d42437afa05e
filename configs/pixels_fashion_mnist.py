"""A linear classifier on the pixels of Fashion-MNIST (28x28): the baseline the CNNs must beat.

Fitted by scikit-learn (`pip install -e '.[baselines]'`) on the same splits and preprocessing
as the CNN configs, the regularisation chosen on the validation split, into a sweep directory
that `python -m cnn_lab.report` reads like a training sweep:

    python -m cnn_lab.baseline --config=configs/pixels_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/logistic
    python -m cnn_lab.baseline --config=configs/pixels_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/sklearn_mlp --config.baseline.classifier=mlp \\
        --config.model.hidden_sizes="(100,)"

The same network trained by cnn_lab (SGD on the cross-entropy, no augmentation):

    python -m cnn_lab.train --config=configs/pixels_fashion_mnist.py --workdir=runs/linear_fmnist

Expected: logistic regression 0.8462 test accuracy (C=0.01 chosen on validation), 1.5 minutes
on 2 CPU cores (the first command); the MLPClassifier 0.8768 (alpha=1e-3 chosen on
validation), 8.7 minutes (the second). Published: Xiao et al. (2017, "Fashion-MNIST", Table 3,
the scikit-learn benchmark) report LogisticRegression at 0.842 and MLPClassifier (100 ReLU
units) at 0.871 test accuracy, trained on all 60k images.
"""

import ml_collections

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("fashion_mnist", image_size=28)
    config.model.name = "mlp"  # The network the classifier fits (parameters are counted on it).
    config.model.hidden_sizes = ()  # No hidden layer: a linear model, logistic regression.
    config.model.dropout_rate = 0.0  # Nothing to drop.
    config.baseline = ml_collections.ConfigDict()
    # logistic_regression | mlp (scikit-learn's MLPClassifier of config.model.hidden_sizes).
    config.baseline.classifier = "logistic_regression"
    config.baseline.c_values = (0.01, 0.1, 1.0)  # logistic_regression: inverse L2 strengths tried.
    config.baseline.alpha_values = (1e-4, 1e-3)  # mlp: L2 penalties tried.
    config.baseline.max_iter = 200  # lbfgs iterations (logistic_regression), epochs (mlp).
    config.optimizer.name = "adam"  # cnn_lab.train only: Adam on the same linear model.
    config.optimizer.learning_rate = 1e-3  # Adam's usual rate.
    config.optimizer.weight_decay = 0.0  # The linear model does not overfit 54k images.
    config.train.num_epochs = 15  # cnn_lab.train only.
    config.train.log_every_steps = 100  # Train metrics about 4 times per epoch.
    return common.apply_mode(config, mode)


def get_report() -> dict:
    """The published figures beside this config's rows in `python -m cnn_lab.report`."""
    return {
        "published": {
            "": "0.842 LogisticRegression (Xiao et al. 2017, Table 3)",
            "baseline.classifier=mlp": "0.871 MLPClassifier, 100 ReLU (Xiao et al. 2017)",
        }
    }

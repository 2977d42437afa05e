"""Transfer demo: digits 5-9 from 3 labels per class, starting from a LeNet-5 of digits 0-4.

First pre-train (configs/transfer_digits_pretrain.py), then, from the same directory:

    python -m cnn_lab.train --config=configs/transfer_digits.py --workdir=runs/transfer_digits

The default is full fine-tuning in two phases: the new head alone (backbone frozen), then
every layer at a lower learning rate. `get_sweep()` compares it with training from
scratch and with training the head only, 3 seeds each (docs/transfer.md, "The digits demo"):

    python -m launch.sweep --config=configs/transfer_digits.py --sweep_dir=runs/transfer_demo \\
        --parallel=2 && python -m cnn_lab.report runs/transfer_demo

Expected: test accuracy on the 224 test images of digits 5-9, seeds 0-2, 0.8810 +- 0.0438
fine-tuned (scratch 0.8750 +- 0.0702, head only 0.7396 +- 0.0304), each run about a minute on
2 CPU cores shared with other jobs, no accelerator.
"""

from cnn_lab.configs import common, lenet_digits

PRETRAINED = "runs/transfer_digits_pretrain"  # Workdir of configs/transfer_digits_pretrain.py.
BACKBONE = ("Conv_.*", "Dense_0", "Dense_1")  # LeNet-5 below its classifier, Dense_2.
HEAD_EPOCHS, EPOCHS = 5, 60
HEAD_LEARNING_RATE, LEARNING_RATE = 1e-2, 2e-3  # The new head alone; every layer (and scratch).


def get_config(mode: str | None = None):
    config = lenet_digits.get_config()
    config.data.classes = (5, 6, 7, 8, 9)
    config.data.train_examples_per_class = 3
    config.model.num_classes = 5
    config.train.batch_size = 5  # 3 steps per epoch.
    config.train.num_epochs = EPOCHS
    config.optimizer.learning_rate = LEARNING_RATE  # From scratch, and phases that set none.
    config.init_from.workdir = PRETRAINED
    config.init_from.head = ("Dense_2",)  # 5 outputs for 0-4 there, 5 for 5-9 here: new.
    config.phases = (
        dict(epochs=HEAD_EPOCHS, freeze=BACKBONE, learning_rate=HEAD_LEARNING_RATE),
        dict(epochs=EPOCHS - HEAD_EPOCHS, learning_rate=LEARNING_RATE),
    )
    config = common.apply_mode(config, mode)
    if mode == "smoke":  # Smoke trains for 2 epochs: one per phase.
        config.phases = (dict(epochs=1, freeze=BACKBONE), dict(epochs=1))
    return config


def get_sweep() -> list[dict]:
    """From scratch, head only and fine-tuned (in this order), seeds 0, 1, 2 each; a seed also
    picks the 3 labelled examples per class, the same ones in every mode."""
    modes = {
        "scratch": {"init_from.workdir": "", "phases": ()},
        "head_only": {
            "phases": (dict(epochs=EPOCHS, freeze=BACKBONE, learning_rate=HEAD_LEARNING_RATE),)
        },
        "finetune": {},
    }
    return [
        {"label": mode, "seed": seed, **overrides}
        for mode, overrides in modes.items()
        for seed in (0, 1, 2)
    ]

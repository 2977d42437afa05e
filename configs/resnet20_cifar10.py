"""ResNet-20 on CIFAR-10 with He et al. (2016)'s recipe; other depths by `--config.model.depth`.

    python -m cnn_lab.train --config=configs/resnet20_cifar10.py --workdir=runs/resnet20_cifar10
    python -m cnn_lab.train --config=configs/resnet20_cifar10.py --workdir=runs/resnet56_cifar10 \\
        --config.model.depth=56

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

Recipe (He et al., 2016, "Deep residual learning for image recognition", section 4.2): SGD with
momentum 0.9, learning rate 0.1, batch 128, weight decay 1e-4, rate divided by 10 at 32k and
48k iterations, stop at 64k; trained on a 45k/5k train/validation split; option A (zero-pad)
shortcuts; 4-pixel pad-and-crop and horizontal flips. With 45,000 // 128 = 351 steps per
epoch that is 182 epochs (63,882 steps) with decays at steps 32,000 and 48,000.

Difference from the paper: weight decay skips biases and BatchNorm parameters (the paper's
Torch code decays every parameter).

Expected: not measured here (no CIFAR-10 on the development machine). He et al. (Table 6,
test error, trained on all 50k images) report ResNet-20 8.75%, 32 7.51%, 44 7.17%, 56 6.97%,
110 6.43%, i.e. accuracy 0.9125 for ResNet-20. About 41M multiply-adds per image forward;
`cnn_lab.benchmark` measures the train step at 657 images/s on 2 CPU cores
(docs/cpu_kernels.md).
`--config.model.stochastic_depth_rate=0.5` with depth 110 is Huang et al. (2016)'s CIFAR run.
"""

from cnn_lab.configs import common

_TRAIN_EXAMPLES = 45_000  # He et al.'s split: 45k train, 5k validation.
_BATCH_SIZE = 128
_STEPS_PER_EPOCH = _TRAIN_EXAMPLES // _BATCH_SIZE  # 351


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.data.train_split = f"train[:{_TRAIN_EXAMPLES}]"  # The paper's 45k training images.
    config.data.validation_split = f"train[{_TRAIN_EXAMPLES}:]"  # The paper's 5k validation images.
    config.augment.crop_padding = 4  # Pad 4 and crop 32x32 at random.
    config.augment.flip = True  # Mirrored objects keep their class.
    config.model.name = "resnet"
    config.model.family = "cifar"  # 3x3 stem with 16 channels, three stages of 16/32/64.
    config.model.depth = 20  # 6n+2: 20, 32, 44, 56, 110 (Table 6), 1202.
    config.model.shortcut = "A"  # Parameter-free zero-pad shortcuts, as the paper on CIFAR.
    config.model.stochastic_depth_rate = 0.0  # Off in He et al.; Huang et al. use 0.5 at 110.
    config.optimizer.name = "sgd"  # SGD with momentum, as in the paper.
    config.optimizer.learning_rate = 0.1  # The paper's initial rate.
    config.optimizer.momentum = 0.9  # The paper's momentum.
    config.optimizer.nesterov = False  # Plain (heavy-ball) momentum, as in the paper.
    config.optimizer.weight_decay = 1e-4  # The paper's L2 weight decay.
    config.schedule.name = "piecewise"  # Constant rate, multiplied by decay_factor at steps.
    config.schedule.warmup_epochs = 0.0  # None for ResNet-20..56 (ResNet-110: 0.01 for 400 steps).
    config.schedule.decay_epochs = (
        32_000 / _STEPS_PER_EPOCH,  # Divide by 10 at iteration 32k (epoch ~91.2) ...
        48_000 / _STEPS_PER_EPOCH,  # ... and at 48k (epoch ~136.8).
    )
    config.schedule.decay_factor = 0.1  # Divide by 10 at each decay.
    config.train.batch_size = _BATCH_SIZE  # The paper's mini-batch.
    config.train.num_epochs = 182  # 63,882 steps: the paper's 64k iterations.
    config.train.log_every_steps = 100  # Train metrics about 3.5 times per epoch.
    return common.apply_mode(config, mode)

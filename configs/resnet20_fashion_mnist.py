"""ResNet-20 (CIFAR family) on Fashion-MNIST at 28x28, with EMA and Polyak averages kept.

    python -m cnn_lab.train --config=configs/resnet20_fashion_mnist.py --workdir=runs/resnet20_fmnist
    python -m launch.sweep --config=configs/resnet20_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/resnet20 --seeds=3

Other depths and the stochastic-depth ablation by axes, e.g. ResNet-56 at four rates, over
20 epochs (a ResNet-56 step costs 3.5 times ResNet-20's: 4 runs of 40 epochs take 12 hours):

    python -m launch.sweep --config=configs/resnet20_fashion_mnist.py \\
        --sweep_dir=runs/fmnist/resnet56_sd --config.model.depth=56 \\
        --config.train.num_epochs=20 --axis=model.stochastic_depth_rate=0,0.1,0.2,0.5

Offline: `apt-get install dataset-fashion-mnist` provides the original IDX files, which
cnn_lab prepares into TFDS format on first use (or set config.data.source_dir).

Recipe: He et al. (2016)'s CIFAR ResNet-20 (option A shortcuts, SGD with momentum 0.9, batch
128, lr 0.1) with a 40-epoch cosine schedule instead of 182 epochs of steps, Nesterov
momentum and weight decay 5e-4 (the common short-schedule setting), 2-pixel shifts (the
garments are centred in 28x28 frames) and mirror images. Trained on 54k images; the other 6k
of the training set choose best/. The test record also scores the EMA and the Polyak
average of the same run.

Published: Zhong et al. (2017, "Random erasing data augmentation", Table 3) report ResNet-20
at 94.28% test accuracy with random crops and flips (94.95% with random erasing).

Expected: test accuracy 0.9445 +- 0.0016 over seeds 0-2 (0.9442, 0.9430, 0.9462; EMA 0.9445,
0.9424, 0.9461; Polyak 0.9451, 0.9431, 0.9454; final validation 0.9470, 0.9517, 0.9502), above
the published 94.28%; the records are in results/fashion_mnist/resnet20/. The three seeds'
softmax average,

    python -m cnn_lab.evaluate --checkpoint=latest --ensemble runs/fmnist/resnet20/seed=0 \
        runs/fmnist/resnet20/seed=1 runs/fmnist/resnet20/seed=2

scores 0.9489, with test NLL 0.1435 and expected calibration error 0.0086 against its members'
0.164-0.167 and 0.017-0.020; each member's own flip or crop test-time augmentation, reported
by the same command, gives 0.9441-0.9489. An earlier machine, whose records are lost, gave
0.9447, 0.9469 and 0.9480 for the seeds and 0.9532 for their average. An epoch takes 70-86 s
on 2 CPU cores without other jobs (seed 1: 49.9 minutes, seed 2: 56.0), up to 227 s while the
test suite shares them (seed 0 took 70 minutes so).

Random erasing (Zhong et al. 2017: half the images get a box of noise over 2-40% of their
area), seed 0:

    python -m launch.sweep --config=configs/resnet20_fashion_mnist.py --seeds=1 \
        --sweep_dir=runs/fmnist/resnet20_erasing --config.augment.random_erasing=0.5

scores 0.9452 (EMA 0.9444, Polyak 0.9452; final validation 0.9522) in 63.7 minutes, inside
the spread of the seeds above and 0.43 point below Zhong et al.'s 94.95%, with test NLL 0.1525
against their 0.164-0.167. In 40 epochs the model does not fit the erased images (final
training loss on them 0.129, against 0.065-0.075 on the plain ones), so here erasing buys
calibration rather than accuracy; a longer schedule is the lever left untested.
Seeds 1-2 are training into results/fashion_mnist/resnet20_erasing/.

Snapshot ensemble of the same 40-epoch budget (Huang et al. 2017: 5 cosine cycles of 8
epochs, a snapshot at the end of each), seed 0:

    python -m launch.sweep --config=configs/resnet20_fashion_mnist.py --seeds=1 \
        --sweep_dir=runs/fmnist/resnet20_snapshots \
        --config.schedule.name=cyclic_cosine --config.schedule.cycles=5
    python -m cnn_lab.evaluate --checkpoint=latest --variants=raw,snapshots \
        runs/fmnist/resnet20_snapshots/seed=0

The last snapshot scores 0.9434 and the five snapshots' softmax average 0.9439 (the members
0.9306-0.9434; they disagree on 3.2% of the test images), below the single cosine run: on
this budget each 8-epoch cycle trains its snapshot less than one 40-epoch schedule trains its
model, and the ensemble wins back only its calibration (expected calibration error 0.0062
against the last snapshot's 0.0103). Huang et al. gave each of their 5 ResNet cycles 40
epochs (a 200-epoch budget on CIFAR), as long as this whole run.
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("fashion_mnist", image_size=28)
    config.model.name = "resnet"
    config.model.family = "cifar"  # 3x3 stem, three stages of 16/32/64 channels.
    config.model.depth = 20  # 6n+2: 20, 32, 44, 56, 110.
    config.model.shortcut = "A"  # Parameter-free zero-pad shortcuts, as He et al. on CIFAR.
    config.model.stochastic_depth_rate = 0.0  # Drop probability of the last block; 0: off.
    config.augment.crop_padding = 2  # Shifts of up to 2 pixels: the garments are centred.
    config.augment.flip = True  # A mirrored garment keeps its class.
    config.optimizer.name = "sgd"  # SGD with momentum, as He et al.
    config.optimizer.learning_rate = 0.1  # He et al.'s rate, reached after the warm-up.
    config.optimizer.nesterov = True  # Nesterov momentum 0.9.
    config.optimizer.weight_decay = 5e-4  # The usual setting for short schedules.
    config.schedule.name = "cosine"  # Cosine decay to 0 after the warm-up.
    config.schedule.warmup_epochs = 1.0  # Linear warm-up over the first epoch.
    config.train.batch_size = 128  # He et al.'s mini-batch: 421 steps per epoch.
    config.train.num_epochs = 40  # 16,840 steps.
    config.train.log_every_steps = 100  # Train metrics about 4 times per epoch.
    config.averaging.ema_decay = 0.999  # EMA over about 1,000 steps (2.4 epochs).
    config.averaging.polyak_start_epoch = 30.0  # Uniform average of the last quarter.
    return common.apply_mode(config, mode)


def get_report() -> dict:
    """The published figures beside this config's rows in `python -m cnn_lab.report`."""
    return {
        "published": {
            "": "0.9428 ResNet-20, crops and flips (Zhong et al. 2017, Table 3)",
            "augment.random_erasing=0.5": (
                "0.9495 ResNet-20, crops, flips and random erasing (Zhong et al. 2017, Table 3)"
            ),
            "model.depth=56": "0.949 ResNet-18 (Zalando benchmark table); none for ResNet-56",
        }
    }

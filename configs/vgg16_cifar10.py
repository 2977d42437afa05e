"""VGG-16 with BatchNorm and a one-layer CIFAR head on CIFAR-10 (32x32 RGB).

    python -m cnn_lab.train --config=configs/vgg16_cifar10.py --workdir=runs/vgg16_cifar10

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10` on a machine with internet).

Recipe: the usual CIFAR one for VGG-BN (kuangliu/pytorch-cifar): SGD with momentum 0.9,
learning rate 0.1, batch 128, weight decay 5e-4, cosine decay over 200 epochs, 4-pixel
pad-and-crop and horizontal flips; the head is one dense layer from the 1x1x512 map
(14.7M parameters). Simonyan & Zisserman (2014) trained on ImageNet only (batch 256, lr 0.01
divided by 10 on plateaus, weight decay 5e-4, dropout 0.5 in a 4096-4096 head).

Difference: validation is carved from train (45k/5k) where kuangliu trains on all 50k.

Expected: not measured here (no CIFAR-10 on the development machine). kuangliu reports 0.9264
test accuracy for VGG-16 trained on all 50k images. About 0.31G multiply-adds per image
forward.
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("cifar10", image_size=32)
    config.augment.crop_padding = 4  # Pad 4 and crop 32x32 at random.
    config.augment.flip = True  # Mirrored objects keep their class.
    config.model.name = "vgg"
    config.model.depth = 16  # Configuration D: 13 convs in stages of 2, 2, 3, 3, 3.
    config.model.batch_norm = True  # BN after every conv (torchvision's vgg16_bn).
    config.model.hidden_sizes = ()  # CIFAR head: one dense layer from the 512 features.
    config.model.dropout_rate = 0.0  # No hidden dense layers, so nothing to drop.
    config.optimizer.name = "sgd"  # SGD with momentum.
    config.optimizer.learning_rate = 0.1  # kuangliu's rate; 0.05 if the first epochs diverge.
    config.optimizer.momentum = 0.9  # kuangliu's momentum.
    config.optimizer.nesterov = False  # Plain momentum, as in kuangliu's script.
    config.optimizer.weight_decay = 5e-4  # On kernels only.
    config.schedule.name = "cosine"  # Cosine annealing to 0 over the whole run.
    config.schedule.warmup_epochs = 0.0  # BN makes a warm-up unnecessary at this rate.
    config.train.batch_size = 128  # kuangliu's batch.
    config.train.num_epochs = 200  # kuangliu's length.
    config.train.log_every_steps = 100  # Train metrics about 3.5 times per epoch.
    return common.apply_mode(config, mode)

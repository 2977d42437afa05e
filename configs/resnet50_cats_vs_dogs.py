"""ResNet-50 fine-tuned on Cats vs Dogs from an ImageNet run: the lectures' domain transfer.

    python -m cnn_lab.train --config=configs/resnet50_cats_vs_dogs.py \\
        --workdir=runs/resnet50_cats_vs_dogs --config.init_from.workdir=runs/resnet50_imagenet

The ImageNet run is configs/resnet50_imagenet.py (or any Orbax checkpoint of the same
ResNet-50). Its 1000-way head is replaced by a new 2-way one; phase 1 trains that head alone
(everything else frozen, BatchNorm in inference mode) for 2 epochs at learning rate 0.01,
phase 2 fine-tunes every layer for 8 epochs at 0.001 (cosine). Cats vs Dogs (Microsoft's
Asirra images, 23,262 JPEGs of varied sizes, one TFDS split "train") is carved into 80%
train, 10% validation and 10% test. cnn_lab never downloads unless asked: on a machine with
internet access, add --config.data.download=True and TFDS downloads and prepares it (786 MB)
on first use; without a network, prepare it elsewhere (`tfds build cats_vs_dogs`) and point
--config.data.data_dir at that TFDS directory.

Input: streaming (variable-sized JPEGs are decoded, resized and centre-cropped on the host),
random-resized crops and flips on the devices, 224x224 as in ImageNet training.

Expected: not measured here (no network on the development machine, so neither Cats vs Dogs
nor the ImageNet run). The digits pair transfer_digits_pretrain.py / transfer_digits.py
demonstrates the same recipe end to end, with measured results.
"""

from cnn_lab.configs import common, resnet50_imagenet


def get_config(mode: str | None = None):
    imagenet = resnet50_imagenet.get_config()
    config = common.get_base_config("cats_vs_dogs", image_size=224)
    config.model = imagenet.model  # The ResNet-50 whose weights are loaded.
    config.model.num_classes = 2  # Cats and dogs: a new head.
    config.data.train_split = "train[:80%]"  # The only TFDS split, carved three ways.
    config.data.validation_split = "train[80%:90%]"  # Model selection.
    config.data.test_split = "train[90%:]"  # Reported once, at the end.
    config.data.input_mode = "streaming"  # Variable-sized JPEGs: decoded on the host.
    config.data.eval_crop_fraction = 0.875  # Centre 224 of the 256-resized image.
    config.augment.resized_crop = True  # Scale augmentation, as in ImageNet training.
    config.augment.flip = True  # A mirrored cat is a cat.
    config.init_from.workdir = "runs/resnet50_imagenet"  # The pre-trained run.
    config.init_from.head = ("head",)  # ResNet's classifier: 1000 outputs there, 2 here.
    config.optimizer.name = "sgd"  # SGD with momentum 0.9, as the ImageNet run.
    config.optimizer.momentum = 0.9  # The ImageNet run's momentum.
    config.optimizer.weight_decay = 1e-4  # The ImageNet run's decay.
    config.train.batch_size = 64  # 291 steps per epoch on 18.6k images.
    config.train.num_epochs = 10  # 2 for the head, then 8 for every layer.
    config.train.log_every_steps = 50  # About six times per epoch.
    config.phases = (
        dict(epochs=2, freeze=("^(?!head).*",), learning_rate=0.01),  # The new head alone.
        dict(epochs=8, learning_rate=0.001),  # Every layer, 10x lower.
    )
    return common.apply_mode(config, mode)

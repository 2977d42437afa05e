"""ResNet-50 on ImageNet (ILSVRC-2012) at 224x224 with Goyal et al. (2017)'s batch-256 recipe.

    python -m cnn_lab.train --config=configs/resnet50_imagenet.py --workdir=runs/resnet50_imagenet

ImageNet must be prepared by hand: download ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from image-net.org (registration required) into
<data_dir>/downloads/manual, run `tfds build imagenet2012 --data_dir=<data_dir>` and set
`--config.data.data_dir=<data_dir>`. Without it the run stops at once, saying so.

Recipe (He et al., 2016, section 3.4; Goyal et al., 2017, "Accurate, large minibatch SGD",
their kn=256 baseline): SGD with momentum 0.9, learning rate 0.1 for batch 256 (0.1 * batch /
256 for other batches, with a 5-epoch linear warm-up above 256), weight decay 1e-4 not applied
to BatchNorm's scale and offset, 90 epochs, rate divided by 10 at epochs 30, 60 and 80, the
last BN scale of each residual branch initialised to zero, scale augmentation (random-resized
crop) and horizontal flips in training, one 224x224 centre crop of the 256-resized image in
evaluation.

Expected: not measured here (ImageNet cannot be downloaded on the development machine).
Goyal et al. (Table 1) report top-1 error 23.60% +- 0.12 on the validation set, i.e. top-1
accuracy ~0.764 (the "test" line here, since ImageNet's test labels are not public). 4.1G
multiply-adds per image forward.

Input: streaming (the split does not fit in memory: 1.28M x 224x224x3 bytes is ~190 GB):
each host decodes its part of the training split and takes the random-resized crop from the
whole decoded image, resized to 224; the devices apply the flips inside the train step.
Evaluation resizes the shorter side to 256 (224 / 0.875) and takes the centre 224x224 crop.
"""

from cnn_lab.configs import common


def get_config(mode: str | None = None):
    config = common.get_base_config("imagenet2012", image_size=224)
    config.data.train_split = "train[:99%]"  # Trained on; 1% held out for model selection.
    config.data.validation_split = "train[99%:]"  # "minival", 12.8k images (as big_vision).
    config.data.test_split = "validation"  # The 50k images every paper reports on.
    config.data.input_mode = "streaming"  # Host decoding, per-host shards, device prefetch.
    config.data.eval_crop_fraction = 0.875  # Evaluate the centre 224 of the 256-resized image.
    config.augment.resized_crop = True  # Scale augmentation: 8-100% of the area, 3/4-4/3 aspect.
    config.augment.flip = True  # Horizontal flips.
    config.model.name = "resnet"
    config.model.family = "imagenet"  # 7x7/2 stem + max pool, four stages.
    config.model.depth = 50  # Bottleneck blocks (3, 4, 6, 3); 25.6M parameters.
    config.model.shortcut = "B"  # 1x1 projections when the shape changes (the paper's choice).
    config.model.zero_init_residual = True  # Zero last BN scale per branch (Goyal et al.).
    config.optimizer.name = "sgd"  # SGD with momentum, as in both papers.
    config.optimizer.learning_rate = 0.1  # 0.1 * batch / 256 (linear scaling rule).
    config.optimizer.momentum = 0.9  # Both papers' momentum.
    config.optimizer.nesterov = False  # Plain momentum, as in both papers.
    config.optimizer.weight_decay = 1e-4  # Kernels only: BN scale/offset and biases excluded.
    config.schedule.name = "piecewise"  # Constant rate, multiplied by decay_factor at steps.
    config.schedule.warmup_epochs = 0.0  # Goyal et al.: 5 epochs when batch > 256.
    config.schedule.decay_epochs = (30, 60, 80)  # Divide the rate by 10 at these epochs.
    config.schedule.decay_factor = 0.1  # Divide by 10 at each decay.
    config.train.batch_size = 256  # Global batch over all devices.
    config.train.num_epochs = 90  # Goyal et al.'s length (He et al.: 600k steps, ~120 epochs).
    config.train.log_every_steps = 500  # About ten times per epoch (4,954 steps).
    return common.apply_mode(config, mode)

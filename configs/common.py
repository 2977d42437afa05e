"""Defaults shared by every config: each knob a user can set, with what it means.

Each config file runs as `python -m cnn_lab.train --config=configs/<name>.py --workdir=<dir>`;
its docstring gives that command and the expected result: accuracy, wall time and the hardware
it was measured on, or the paper's figure where nothing was measured here.
"""

import ml_collections
from ml_collections import config_dict

# Native image shape and per-channel statistics of the data sets cnn_lab knows;
# `flip`: a horizontal mirror keeps the label (not for digits: a mirrored 3 is no digit).
DATASETS = {
    "digits": dict(channels=1, num_classes=10, mean=(0.3,), std=(0.38,), flip=False),
    "mnist": dict(channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,), flip=False),
    "fashion_mnist": dict(channels=1, num_classes=10, mean=(0.286,), std=(0.353,), flip=True),
    "cifar10": dict(
        channels=3,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.2435, 0.2616),
        flip=True,
    ),
    "cifar100": dict(
        channels=3,
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        flip=True,
    ),
    "cats_vs_dogs": dict(
        channels=3,
        num_classes=2,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        flip=True,
    ),
    "imagenet2012": dict(
        channels=3,
        num_classes=1000,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        flip=True,
    ),
}


def get_base_config(dataset: str, image_size: int) -> ml_collections.ConfigDict:
    """All knobs with their defaults, for `dataset` resized to `image_size` x `image_size`.

    For a data set not in DATASETS, channels, num_classes, mean and std are left unset (None),
    for the config to set (or, for own data, the run to take from the data).
    """
    stats = DATASETS.get(dataset) or dict(
        channels=config_dict.placeholder(int),
        num_classes=config_dict.placeholder(int),
        mean=config_dict.placeholder(tuple),
        std=config_dict.placeholder(tuple),
        flip=False,
    )
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, dropout and the data order.

    config.data = ml_collections.ConfigDict()
    config.data.name = dataset  # 'digits' (embedded), 'own_data' (source_dir) or a TFDS name.
    config.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS's default.
    config.data.download = False  # Let TFDS download and prepare a public data set not prepared.
    # Your images (a folder or .npz; any config then trains on them, see configs/own_data.py),
    # or fashion_mnist's IDX files; None: the data set named above.
    config.data.source_dir = config_dict.placeholder(str)
    config.data.default_image_size = 32  # Own data of several image sizes: resized to this.
    config.data.val_fraction = 0.1  # Own data without a val split: this share of each class.
    config.data.test_fraction = 0.1  # Own data without a test split: this share of each class.
    config.data.split_seed = 0  # Seeds those splits (not config.seed: the same for every run).
    config.data.skip_bad_files = False  # Own data: train without files that are not images.
    config.data.train_split = "train[:90%]"  # TFDS split string trained on.
    config.data.validation_split = (
        "train[90%:]"  # Carved from train: model selection never sees test.
    )
    config.data.test_split = "test"  # Evaluated once, at the end.
    config.data.image_size = image_size  # Images are resized to this square side.
    config.data.keep_decoded = True  # Keep decoded splits by the TFDS files: fast restarts.
    config.data.input_mode = "auto"  # device | streaming | auto (device if the split fits).
    config.data.device_memory_mb = 2048  # auto: largest training split (uint8) kept on devices.
    config.data.mapped_max_gb = 64.0  # streaming: train split decoded once to a file up to this.
    config.data.eval_crop_fraction = 1.0  # streaming eval: resize to size / this, centre-crop.
    config.data.channels = stats["channels"]  # Channels of the images (1 grey, 3 RGB).
    config.data.mean = stats["mean"]  # Per-channel mean of pixels in [0, 1], subtracted.
    config.data.std = stats["std"]  # Per-channel std of pixels in [0, 1], divided by.
    config.data.flip_preserves_label = stats["flip"]  # Mirrored images keep their label.
    config.data.classes = ()  # Keep only these labels, renumbered 0, 1, ... in this order; (): all.
    config.data.train_examples_per_class = 0  # Train on this many of each class (seeded); 0: all.

    # Training augmentation, on the devices inside the jitted step (both input modes).
    config.augment = ml_collections.ConfigDict()
    config.augment.crop_padding = 0  # Zero-pad by this many pixels, crop back at random (0: off).
    config.augment.flip = False  # Mirror half the images (only where the label survives it).
    config.augment.resized_crop = False  # Random area/aspect crop resized back (Inception style).
    config.augment.resized_crop_scale = (0.08, 1.0)  # resized_crop: range of the area kept.
    config.augment.resized_crop_ratio = (3 / 4, 4 / 3)  # resized_crop: range of aspect ratios.
    config.augment.brightness = 0.0  # Colour jitter: brightness factor in [1 - b, 1 + b].
    config.augment.contrast = 0.0  # Colour jitter: contrast factor in [1 - c, 1 + c].
    config.augment.saturation = 0.0  # Colour jitter: saturation factor in [1 - s, 1 + s].
    config.augment.pca_lighting = 0.0  # AlexNet PCA lighting noise std (RGB; 0.1 in the paper).
    config.augment.random_erasing = 0.0  # Erase a box of noise in this share of images (0: off).
    config.augment.random_erasing_area = (0.02, 0.4)  # random_erasing: range of its area fraction.
    config.augment.random_erasing_aspect = (0.3, 1 / 0.3)  # random_erasing: range of height/width.
    config.augment.mixup_alpha = 0.0  # Mixup Beta(alpha, alpha) (0: off).
    config.augment.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha) (0: off).

    config.model = ml_collections.ConfigDict()
    config.model.num_classes = stats["num_classes"]  # Must match the data set's classes.
    config.model.compute_dtype = "float32"  # float32 | bfloat16 | float16: activations, not params.
    # auto | xla | onednn | batch_minor: auto is cnn_lab's CPU kernels on a CPU, else XLA's.
    config.model.conv_implementation = "auto"
    config.model.remove = ()  # Layers left out, e.g. ("fc7",) (AlexNet, VGG, MLP, ConvNet).

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # sgd | adam | adamw.
    config.optimizer.learning_rate = 0.1  # Peak learning rate (after warm-up).
    config.optimizer.momentum = 0.9  # sgd: momentum (0 for plain SGD).
    config.optimizer.nesterov = True  # sgd: Nesterov momentum.
    config.optimizer.b1 = 0.9  # adam/adamw: first-moment decay.
    config.optimizer.b2 = 0.999  # adam/adamw: second-moment decay.
    config.optimizer.eps = 1e-8  # adam/adamw: denominator epsilon.
    config.optimizer.weight_decay = 5e-4  # On kernels only: L2 for sgd/adam, decoupled for adamw.
    config.optimizer.grad_clip_norm = config_dict.placeholder(
        float
    )  # Clip global grad norm; None: off.
    config.optimizer.param_groups = ()  # ((path pattern, lr multiplier), ...); first match wins.

    # Start from another run's weights (transfer learning); a resumed run ignores this.
    config.init_from = ml_collections.ConfigDict()
    config.init_from.workdir = ""  # A run's workdir or an Orbax checkpoint dir; "": from scratch.
    config.init_from.checkpoint = "best"  # Of a workdir: best | latest | a step number.
    config.init_from.load = (".*",)  # Path patterns (params and BN statistics) loaded from it.
    config.init_from.head = ()  # Path patterns of the classifier head: new, never loaded.

    # Phases, each dict(epochs=, freeze=(path patterns), learning_rate=), trained in order,
    # each with a fresh optimizer and its own schedule; (): one phase, nothing frozen.
    config.phases = ()

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "cosine"  # constant | piecewise | cosine | cyclic_cosine | plateau.
    config.schedule.warmup_epochs = 0.0  # Linear warm-up from 0 (cosine, piecewise, constant).
    config.schedule.decay_epochs = ()  # piecewise: epochs at which the rate is multiplied by decay_factor.
    config.schedule.decay_factor = 0.1  # piecewise and plateau: multiplier at each decay.
    config.schedule.plateau_patience = 3  # plateau: epochs without validation gain before decaying.
    config.schedule.plateau_min_delta = (
        1e-3  # plateau: smaller validation-accuracy gains do not count.
    )
    config.schedule.cycles = (
        5  # cyclic_cosine: restarts (snapshot ensembles save each cycle's end).
    )

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # Global batch over all devices and hosts.
    config.train.grad_accumulation_steps = 1  # Micro-batches per step: batch_size / this at once.
    config.train.num_epochs = 30  # Length of training.
    config.train.label_smoothing = 0.0  # Mass moved from the label to the uniform distribution.
    config.train.log_every_steps = 50  # Train metrics are averaged and written this often.
    config.train.early_stopping_patience = config_dict.placeholder(
        int
    )  # Stop after this many epochs without validation gain; None: off.
    config.train.progress_bar = True  # tqdm bars for training and evaluation, on a terminal only.
    config.train.cpu_devices = 0  # CPU devices to split into; 0: 1 with CPU kernels, else 1/core.
    config.train.keep_freed_memory = True  # Host malloc keeps freed pages: no faults each step.
    config.train.frozen_bn_inference = True  # Frozen BatchNorm layers use their statistics.
    config.train.loss_scale_init = 2.0**15  # float16: initial loss scale; halved on each overflow.
    config.train.loss_scale_growth_steps = 2000  # float16: finite steps before the scale doubles.

    config.averaging = ml_collections.ConfigDict()
    config.averaging.ema_decay = config_dict.placeholder(
        float
    )  # EMA of the weights and BN statistics, e.g. 0.999; None: off.
    config.averaging.ema_debias = (
        True  # EMA starts at zero and is bias-corrected (no warm-up bias).
    )
    config.averaging.polyak_start_epoch = config_dict.placeholder(
        float
    )  # Uniform (Polyak) average of the weights from this epoch on; None: off.
    config.averaging.batch_stats = "average"  # average | recompute: BN statistics of averages.
    config.averaging.recompute_batches = 20  # recompute: training batches to re-estimate them.
    config.averaging.select = "raw"  # raw | ema | polyak: picks best/ and drives early stopping.

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 512  # Global eval batch; the last partial batch is padded and masked.
    config.eval.snapshots = 0  # Snapshot ensemble: average the last this many snapshots; 0: all.
    config.eval.crop_fraction = 0.875  # Crop TTA (no augment.crop_padding): resize to size / this.
    config.eval.scales = ()  # Multi-scale TTA: extra input sides (models with global pooling).
    config.eval.mc_dropout_samples = 8  # MC-dropout TTA: stochastic passes averaged.

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.keep = 3  # Latest checkpoints kept (the best is kept apart, in best/).
    config.checkpoint.every_steps = 0  # Also save every this many steps (0: at epoch ends only).

    # Where metrics go besides metrics.jsonl and TensorBoard (always written).
    config.logging = ml_collections.ConfigDict()
    config.logging.wandb_project = ""  # W&B project to log to ("": off); needs the wandb extra.
    return config


def apply_mode(config: ml_collections.ConfigDict, mode: str | None) -> ml_collections.ConfigDict:
    """`mode="smoke"`: a few steps on slices of the splits, for tests and debugging."""
    if mode is None:
        return config
    if mode != "smoke":
        raise ValueError(f"Unknown config mode {mode!r}: use ':smoke' or nothing.")
    config.data.train_split = "train[:512]"
    config.data.validation_split = "train[-256:]"
    config.data.test_split = "test[:256]"
    config.train.num_epochs = 2
    config.train.log_every_steps = 2
    config.train.progress_bar = False
    return config

"""Your own images: a folder of class folders, or a NumPy .npz file, with a zoo model's recipe.

    python -m cnn_lab.train --config=configs/own_data.py --config.data.source_dir=DIR \\
        --workdir=runs/own_data
    python -m cnn_lab.train --config=configs/own_data.py:resnet20 \\
        --config.data.source_dir=data.npz --workdir=runs/own_resnet20

DIR holds DIR/<class>/* (validation and test are split off per class by val_fraction and
test_fraction, seeded by split_seed), or DIR/train/<class>/* with optional DIR/val/ and
DIR/test/ in the same layout. JPEG, PNG, BMP or GIF in any size or mode; class names are the
folder names, sorted. A .npz holds x_train (N, H, W[, C]) uint8 and y_train (N,) int, and
optionally x_val, y_val, x_test, y_test and class_names (Keras' mnist.npz works as is).

Left unset (None), these come from the data: model.num_classes, data.channels (3 if any image
has colour), data.image_size (the images' own when they all share one square size, else
default_image_size) and data.mean / data.std (from the training split). The images are
decoded once into a TFDS copy kept beside them (DIR/.cnn_lab/, or .FILE.npz.cnn_lab/), in
the workdir when that folder is read-only, or under --config.data.data_dir when set.

The argument picks the model and its recipe from the zoo (convnet, the default; lenet5,
resnet20, mlp), and `smoke` a few steps on small slices: e.g. `own_data.py:resnet20,smoke`.

Expected: depends on your data; see docs/data.md ("Your own data") for Fashion-MNIST as PNG files.
"""

from ml_collections import config_dict

from cnn_lab.configs import common, convnet_digits, lenet_digits, mlp_digits, resnet20_digits

RECIPES = {
    "convnet": convnet_digits,
    "lenet5": lenet_digits,
    "resnet20": resnet20_digits,
    "mlp": mlp_digits,
}


def get_config(arg: str | None = None):
    words = [w for w in (arg or "").split(",") if w]
    models = [w for w in words if w in RECIPES] or ["convnet"]
    modes = [w for w in words if w not in RECIPES]
    if len(models) > 1 or modes not in ([], ["smoke"]):
        raise ValueError(
            f"configs/own_data.py:{arg}: give at most one model ({', '.join(RECIPES)}) and "
            "'smoke', e.g. configs/own_data.py:resnet20,smoke."
        )
    config = RECIPES[models[0]].get_config()
    base = common.get_base_config("own_data", image_size=32)
    config.data = base.data
    config.model.num_classes = config_dict.placeholder(int)  # None: the data's classes.
    config.data.source_dir = config_dict.placeholder(str)  # A folder or .npz file (required).
    config.data.train_split = "train"
    config.data.validation_split = "val"
    config.data.test_split = "test"
    config.data.image_size = config_dict.placeholder(int)  # None: see the docstring.
    config.data.channels = config_dict.placeholder(int)  # None: 3 if any image has colour.
    config.data.mean = config_dict.placeholder(tuple)  # None: the training split's.
    config.data.std = config_dict.placeholder(tuple)  # None: the training split's.
    config.data.flip_preserves_label = False  # Set True when a mirrored image keeps its class.
    if modes:  # Smoke: slices capped at each split's size, so any data size works.
        config = common.apply_mode(config, "smoke")
        config.data.validation_split = "val[:256]"
    return config

"""Write Fashion-MNIST, from Debian's original IDX files, as a folder of PNG files per class.

    python -m launch.fashion_mnist_folder --out=/tmp/fashion_png
    python -m cnn_lab.train --config=configs/own_data.py:resnet20 \\
        --config.data.source_dir=/tmp/fashion_png --workdir=runs/fashion_png_resnet20

The layout is DIR/train/<class>/<index>.png (60,000) and DIR/test/<class>/<index>.png
(10,000); validation is carved from train by configs/own_data.py. Class folders are named
"<label>-<name>" ("0-T-shirt_top", ..., "9-Ankle_boot") so that their sorted order is
TFDS's label order, and a run on them compares with one on the built-in fashion_mnist.
The IDX files come from `apt-get install dataset-fashion-mnist` (or --source).
"""

import argparse
import os
from pathlib import Path

from PIL import Image

from cnn_lab.data.builders import FASHION_MNIST_FILES, read_idx
from cnn_lab.data.loading import FASHION_MNIST_SOURCE_DIRS

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def folder_name(label: int) -> str:
    """'0-T-shirt_top': the label first, so sorted folders keep the label order."""
    return f"{label}-{CLASS_NAMES[label].replace('/', '_').replace(' ', '_')}"


def write_folder(source: Path, out: Path) -> dict[str, int]:
    """Write every image of each split as out/<split>/<class>/<index>.png; returns the counts."""
    counts = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images = read_idx(source / images_file, ndim=3)  # (N, 28, 28) uint8
        labels = read_idx(source / labels_file, ndim=1)  # (N,) uint8
        for label in range(len(CLASS_NAMES)):
            (out / split / folder_name(label)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(out / split / folder_name(int(label)) / f"{index:05d}.png")
        counts[split] = len(labels)
    return counts


def main() -> None:
    """Command line: --out (required), --source (default: Debian's folder)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder to write (created).")
    default = next((d for d in FASHION_MNIST_SOURCE_DIRS if os.path.isdir(d)), None)
    parser.add_argument("--source", type=Path, default=default, help="Folder of the IDX files.")
    args = parser.parse_args()
    if args.source is None:
        parser.error("no IDX files found: apt-get install dataset-fashion-mnist, or pass --source.")
    counts = write_folder(args.source, args.out)
    print(f"wrote {counts} PNG files under {args.out}")


if __name__ == "__main__":
    main()

"""Training-time augmentations on host batches; randomness from an explicit NumPy generator."""

import numpy as np


def random_crop(images: np.ndarray, padding: int, offsets: np.ndarray) -> np.ndarray:
    """Zero-pad images (B, H, W, C) by `padding` and crop back to (H, W) at offsets (B, 2)."""
    _, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return np.stack(
        [padded[i, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    )


def crop_offsets(rng: np.random.Generator, batch_size: int, padding: int) -> np.ndarray:
    """Uniform (dy, dx) in [0, 2 * padding] for each of `batch_size` images: (B, 2) int."""
    return rng.integers(0, 2 * padding + 1, size=(batch_size, 2))

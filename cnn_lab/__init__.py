"""cnn_lab: convolutional image classifiers in JAX, data-parallel over every device."""

from cnn_lab.checkpoint import load_run

__all__ = ["load_run"]

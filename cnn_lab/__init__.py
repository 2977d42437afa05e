"""cnn_lab: convolutional image classifiers in JAX, data-parallel over every device."""

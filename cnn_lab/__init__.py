"""cnn_lab: convolutional image classifiers in JAX, data-parallel over every device."""

__all__ = ["load_run", "predict_files"]


def __getattr__(name: str):
    # Lazy, so importing cnn_lab.data or cnn_lab.losses does not load Orbax and every model.
    if name == "load_run":
        from cnn_lab.saved_run import load_run

        return load_run
    if name == "predict_files":
        from cnn_lab.tools.classify import predict_files

        return predict_files
    raise AttributeError(f"module 'cnn_lab' has no attribute {name!r}")

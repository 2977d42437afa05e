"""Published ImageNet weights (torchvision and timm files) imported as cnn_lab runs."""

from cnn_lab.weights.architectures import ARCHITECTURES
from cnn_lab.weights.importing import imagenet_class_names, import_weights

__all__ = ["ARCHITECTURES", "imagenet_class_names", "import_weights"]

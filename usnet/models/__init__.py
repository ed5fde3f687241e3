"""The model zoo: universally slimmable models and the plain models they export to."""

from .convnet import ConvNet, convnet
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .zoo import (
    DEFAULT_WIDTH_RANGES,
    create_model,
    list_models,
    us_convnet,
    us_mobilenet_v1,
    us_mobilenet_v2,
    us_resnet18,
    us_resnet50,
)

__all__ = [
    "ConvNet",
    "DEFAULT_WIDTH_RANGES",
    "MobileNetV1",
    "convnet",
    "create_model",
    "list_models",
    "mobilenet_v1",
    "us_convnet",
    "us_mobilenet_v1",
    "us_mobilenet_v2",
    "us_resnet18",
    "us_resnet50",
]

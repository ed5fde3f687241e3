"""The model zoo: universally slimmable models and the plain models they export to."""

from .convnet import ConvNet, convnet
from .mobilenet_v1 import MobileNetV1, mobilenet_v1
from .zoo import (
    DEFAULT_WIDTH_RANGES,
    Architecture,
    architecture,
    create_model,
    list_models,
    model_input_size,
    register_model,
    us_convnet,
    us_mobilenet_v1,
    us_mobilenet_v2,
    us_resnet18,
    us_resnet50,
    us_vit,
    us_vit_small,
    us_vit_tiny,
)

__all__ = [
    "DEFAULT_WIDTH_RANGES",
    "Architecture",
    "ConvNet",
    "MobileNetV1",
    "architecture",
    "convnet",
    "create_model",
    "list_models",
    "mobilenet_v1",
    "model_input_size",
    "register_model",
    "us_convnet",
    "us_mobilenet_v1",
    "us_mobilenet_v2",
    "us_resnet18",
    "us_resnet50",
    "us_vit",
    "us_vit_small",
    "us_vit_tiny",
]

"""The built-in op handlers, by family; importing this package registers them all."""

from . import aten, attention, elementwise, functional, layers, shape

__all__ = ["aten", "attention", "elementwise", "functional", "layers", "shape"]

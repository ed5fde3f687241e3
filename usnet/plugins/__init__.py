"""Plugins for third-party libraries' layer classes (timm), in the spirit of ModelOpt's
``plugins/``: each is loaded by the converter only once the user's code has imported its library
(:func:`usnet.convert.register_plugin`), so usnet never imports timm itself. A plugin imports the
converter and the layers; nothing imports a plugin by name."""

from __future__ import annotations

import importlib

from ..convert import register_plugin

__all__ = ["PLUGIN_MODULES"]

PLUGIN_MODULES: dict[str, str] = {"timm": "usnet.plugins.timm"}
"""Library -> the usnet plugin module for it."""


def _loader(module: str):
    return lambda: importlib.import_module(module)


for _library, _module in PLUGIN_MODULES.items():
    register_plugin(_library, _loader(_module))

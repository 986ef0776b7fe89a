"""The layer registry: cfg `type=` name -> layer class.

Each family module registers its classes with @register when imported; the list below is the
one place that decides which families exist, so a type can never silently drop out.
"""

from . import (combine, conv, cost, data, dropout, fc, imageops, neuron, norm,  # noqa: F401
               pool)
from .base import REGISTRY, BuildContext, Layer, WeightLayer, register, weight_owner

__all__ = ["REGISTRY", "BuildContext", "Layer", "WeightLayer", "register", "weight_owner"]

"""Fisher-information optimizers, usable on their own: ``from fisher_scale.optim import AdaFisher``.

Imports nothing but torch, so the optimizers work in any training loop.
"""

from fisher_scale.optim.adafish import AdaFish, kronecker_direction
from fisher_scale.optim.adafisher import AdaFisher, AdaFisherW, FisherOptimizer
from fisher_scale.optim.layers import LayerRule, register_layer_rule

__all__ = [
    "AdaFish",
    "AdaFisher",
    "AdaFisherW",
    "FisherOptimizer",
    "LayerRule",
    "kronecker_direction",
    "register_layer_rule",
]

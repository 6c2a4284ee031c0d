"""Fisher-information optimizers, usable on their own: ``from fisher_scale.optim import AdaFisher``.

Imports nothing but torch (deepspeed only inside the ZeRO distributors, when one is built), so the optimizers
work in any training loop.
"""

from fisher_scale.optim.adafish import AdaFish, kronecker_direction
from fisher_scale.optim.adafisher import AdaFisher, AdaFisherW, FisherOptimizer
from fisher_scale.optim.layers import LayerRule, register_layer_rule
from fisher_scale.optim.layout import StateLayout
from fisher_scale.optim.registry import OPTIMIZERS, build_optimizer, optimizer_state_bytes, state_layout

__all__ = [
    "OPTIMIZERS",
    "AdaFish",
    "AdaFisher",
    "AdaFisherW",
    "FisherOptimizer",
    "LayerRule",
    "StateLayout",
    "build_optimizer",
    "kronecker_direction",
    "optimizer_state_bytes",
    "register_layer_rule",
    "state_layout",
]
